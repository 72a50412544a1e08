"""Visual-token compression of the draft's input stream (DREAM §3.3): keep the most-attended image tokens."""

from __future__ import annotations

import numpy as np

# score name → the target graph's output holding it (both exported with the attention scores)
VTC_SCORES: dict[str, str] = {
    "mean": "attn_importance",  # DREAM: mean attention each token receives over heads and queries
    "max": "attn_importance_max",  # DREAM-S: the highest attention any query of any head gives it
}


def vtc_score_output(score: str) -> str:
    """The target output that carries the visual-token score `score` ("mean" or "max")."""
    if score not in VTC_SCORES:
        raise ValueError(f"unknown visual-token score {score!r} (one of {', '.join(VTC_SCORES)})")
    return VTC_SCORES[score]


def vtc_kept_count(n_image: int, keep: float) -> int:
    """Image tokens the draft keeps of `n_image` at keep ratio `keep` (at least one of a non-empty image)."""
    return max(1, int(round(n_image * keep))) if n_image else 0


def vtc_keep_indices(image_mask: np.ndarray, importance: np.ndarray, keep: float) -> np.ndarray:
    """Prompt positions the draft keeps: every text token and the `keep` share of image tokens.

    Image tokens are ranked by `importance`, the attention they receive in the target's last layer at
    prefill (one of VTC_SCORES); the kept ones stay in their original order. The target and the
    draft's cross-attention keys always keep every position.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"visual-token keep ratio must be in (0, 1], got {keep}")
    img = np.flatnonzero(image_mask)
    n_keep = vtc_kept_count(len(img), keep)
    top = img[np.argsort(-importance[img], kind="stable")[:n_keep]]
    return np.sort(np.concatenate([np.flatnonzero(~image_mask), top]))
