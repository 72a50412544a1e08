"""Visual-token compression of the draft's input stream (DREAM §3.3): keep the most-attended image tokens."""

from __future__ import annotations

import numpy as np


def vtc_keep_indices(image_mask: np.ndarray, importance: np.ndarray, keep: float) -> np.ndarray:
    """Prompt positions the draft keeps: every text token and the `keep` share of image tokens.

    Image tokens are ranked by the attention they receive in the target's last layer at prefill
    (mean over heads and queries); the kept ones stay in their original order. The target and the
    draft's cross-attention keys always keep every position.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"visual-token keep ratio must be in (0, 1], got {keep}")
    img = np.flatnonzero(image_mask)
    n_keep = max(1, int(round(len(img) * keep))) if len(img) else 0
    top = img[np.argsort(-importance[img], kind="stable")[:n_keep]]
    return np.sort(np.concatenate([np.flatnonzero(~image_mask), top]))
