"""Rotary positions of a prompt, computed by the runtime (numpy) so the target graph takes them as input.

1-D families number the prompt 0..n-1. Qwen2.5-VL numbers it in three axes (temporal, height, width,
"mRoPE"): text advances all three by one per token; an image's tokens take (start + t, start + row,
start + column) over its merged patch grid, and the text after it resumes at start + max(rows, columns).
Generated tokens then continue from the prompt's largest position + 1, i.e. at their index plus the
prompt's `rope_delta` (negative: an image advances positions by its side, not by its area).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mrope_positions(image_mask: np.ndarray, grids: Sequence[Sequence[int]], merge: int) -> tuple[np.ndarray, int]:
    """([3, n] int64 positions, rope delta) of a prompt whose image tokens are `image_mask` [n], one
    contiguous run per image, in order, each laid out over its grid (t, h, w in patches; `merge`² patches
    make one token) — as transformers' Qwen2.5-VL `get_rope_index` computes them for still images."""
    mask = np.asarray(image_mask, bool)
    n = len(mask)
    pos = np.zeros((3, n), np.int64)
    grid_iter = iter(grids)
    cur, i = 0, 0
    while i < n:
        j = i + 1
        while j < n and mask[j] == mask[i]:
            j += 1
        if not mask[i]:
            pos[:, i:j] = cur + np.arange(j - i)
            cur += j - i
        else:
            t, h, w = (int(x) for x in next(grid_iter))
            h, w = h // merge, w // merge
            if t * h * w != j - i:
                raise ValueError(f"an image run of {j - i} tokens does not match its grid {t}×{h}×{w}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            pos[:, i:j] = np.stack([tt, hh, ww]).reshape(3, -1) + cur
            cur += max(h, w)
        i = j
    return pos, int(pos.max(initial=-1)) + 1 - n
