"""The integer bookkeeping of Qwen2.5-VL's window-attention vision tower, in numpy, fed to its vision graph.

Qwen2.5-VL encodes an image as a grid of patches (t, h, w in patches; `merge`² neighbouring patches form one
merged unit, one prompt token). Transformers derives from `image_grid_thw`, with python loops and
`cu_seqlens`, what the tower needs besides the pixels (`transformers.vision_utils`):

- the window order: merged units regrouped window by window (`window` units a side, the grid padded to whole
  windows), and its inverse, which restores the merger's output to row-major units;
- the 2-D rotary position (row, column) of every patch, laid out unit by unit;
- which patches attend to which: within a frame in the full-attention blocks, within a window in the others.

Computing them here keeps the exported graph free of data-dependent shapes: it takes them as inputs
(`core.graph_spec.VISION`) and attends with boolean masks instead of `cu_seqlens` segments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def patch_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """[t·h·w, 2] (row, column) of every patch in the processor's order: unit by unit, row-major inside a unit."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    pos = np.stack([rows.reshape(block).transpose(0, 2, 1, 3).ravel(),
                    cols.reshape(block).transpose(0, 2, 1, 3).ravel()], -1)
    return np.tile(pos, (t, 1)).astype(np.int64)


def window_order(t: int, h: int, w: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit indices in window order, window number of each of them) of one grid: windows of `window`² units,
    row-major over the grid padded to whole windows, the padding dropped (as transformers'
    `get_vision_window_index`, whose empty windows vanish from its `cu_seqlens`)."""
    uh, uw = h // merge, w // merge
    index = np.arange(t * uh * uw).reshape(t, uh, uw)
    # transformers pads a whole extra window where a side divides evenly: empty windows change nothing here
    ph, pw = -uh % window, -uw % window
    padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
    nh, nw = (uh + ph) // window, (uw + pw) // window
    wins = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(-1, window * window)
    keep = wins >= 0
    return wins[keep], np.repeat(np.arange(len(wins)), keep.sum(1))


def vision_grid_inputs(grids: Sequence[Sequence[int]], merge: int, window: int) -> dict[str, np.ndarray]:
    """The vision graph's bookkeeping inputs for images of `grids` ((t, h, w) in patches each, their patches
    concatenated in the pixel input as the processor does):

    window_index [units]: merged units in window order; reverse_index [units]: its inverse permutation;
    patch_positions [patches, 2]: rotary (row, column) per patch in the processor's order;
    full_mask / window_mask [patches, patches] bool, in window order: same frame / same window.
    """
    order, window_id, frame_id, positions = [], [], [], []
    units = windows = frames = 0
    for t, h, w in ((int(a), int(b), int(c)) for a, b, c in grids):
        idx, win = window_order(t, h, w, merge, window)
        per_frame = (h // merge) * (w // merge)
        order.append(idx + units)
        window_id.append(win + windows)
        frame_id.append(idx // per_frame + frames)
        positions.append(patch_positions(t, h, w, merge))
        units, windows, frames = units + t * per_frame, windows + int(win.max(initial=-1)) + 1, frames + t
    index = np.concatenate(order).astype(np.int64)
    unit = merge * merge  # patches per unit: a unit's patches stay together in window order
    win = np.repeat(np.concatenate(window_id), unit)
    frame = np.repeat(np.concatenate(frame_id), unit)
    return {"window_index": index, "reverse_index": np.argsort(index).astype(np.int64),
            "patch_positions": np.concatenate(positions),
            "full_mask": frame[:, None] == frame[None, :], "window_mask": win[:, None] == win[None, :]}
