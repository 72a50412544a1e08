"""Visibility masks over the runtime-owned caches, and row selection for committing a graph's new rows."""

from __future__ import annotations

import numpy as np

# Graphs that read only the used cache slots get masks this many slots wide at a time. ONNX Runtime plans
# a call's memory once per distinct set of input shapes and reuses the plan; a mask one slot wider every
# call would replan every call (measured: +0.9 ms on a 3 ms verify call), while 32-slot steps keep the
# shapes few. The extra slots are masked out (softmax weight exactly 0). An empty cache still gets one
# bucket: no call then carries a zero-size cache slice (histogram calibration cannot take one, and
# engines need not handle empty tensors).
SLOT_BUCKET = 32


def mask_width(capacity: int, filled: int, used_slots: bool) -> int:
    """Cache slots a mask spans over a cache holding `filled` rows: for graphs that read only the used
    slots, `filled` rounded up to `SLOT_BUCKET`, at least one bucket and at most `capacity`; the whole
    capacity otherwise. Build profiles size their masks by this same rule."""
    if not used_slots:
        return capacity
    return min(capacity, max(1, -(-filled // SLOT_BUCKET)) * SLOT_BUCKET)


def cache_mask(capacity: int, committed: int, scratch: np.ndarray | None, new: np.ndarray, used: bool) -> np.ndarray:
    """A graph's visibility mask [queries, W + new rows] over a runtime-owned cache and the call's new rows.

    Every query sees the first `committed` cache slots, then `scratch` [queries, S] over the slots after
    them (this round's draft rows), then `new` over the new rows. W is the capacity, or, for graphs
    exported to read just the used slots (`used`), the committed + scratch slots rounded up to a multiple
    of `SLOT_BUCKET`, at least one bucket and at most the capacity.
    """
    s = 0 if scratch is None else scratch.shape[1]
    width = mask_width(capacity, committed + s, used)
    m = np.zeros((new.shape[0], width + new.shape[1]), bool)
    m[:, :committed] = True
    if s:
        m[:, committed:committed + s] = scratch
    m[:, width:] = new
    return m


def prefill_mask(image_mask: np.ndarray, image_blocks: bool) -> np.ndarray:
    """[n,n] "query may attend key" mask of a prompt of n tokens: causal, and with `image_blocks` (Gemma3)
    every token of a contiguous run of image tokens also sees the rest of its run, as the HF model
    attends at prefill (an image is read bidirectionally; text and later images stay causal).

    The one statement of this rule: the runtime's prefill, the export's parity check and the draft's
    training features all take their prefill masks from here."""
    n = len(image_mask)
    m = np.tril(np.ones((n, n), bool))
    img = np.asarray(image_mask, bool)
    if image_blocks and img.any():
        starts = img & ~np.concatenate([[False], img[:-1]])
        block = np.where(img, np.cumsum(starts) - 1, -1)
        m |= (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    return m


def row_index(rows: np.ndarray) -> slice | np.ndarray:
    """Rows that rise from 0 (a root-to-node path in node order) as an index: a slice (a view, no gather)
    when they are a prefix, as for a chain, a prefill or a plain decoding step."""
    return slice(0, len(rows)) if rows[-1] == len(rows) - 1 else rows
