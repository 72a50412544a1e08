"""Visual-token importance from the target's last-layer attention probabilities [heads, queries, keys].

Both scores reduce over heads and queries together, so they read the same from the per-head layout and
from the grouped one ([kv_heads, rep·queries, keys]).
"""

from __future__ import annotations

import torch


def column_mean(probs: torch.Tensor) -> torch.Tensor:
    """DREAM's score: the mean attention each key receives over heads and queries [keys]."""
    return probs.mean((0, 1))


def query_max(probs: torch.Tensor) -> torch.Tensor:
    """DREAM-S's score: the highest attention any single query (of any head) gives each key [keys].

    A token one query relies on strongly ranks high even when most queries ignore it, which the column mean
    averages away.
    """
    return probs.amax((0, 1))
