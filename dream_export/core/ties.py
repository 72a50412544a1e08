"""Whether two greedy outputs part on a near-tie of the target's logits (no decoder reproduces a tie)."""

from __future__ import annotations

import numpy as np


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length when one output is a prefix of the other)."""
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def tie_explained(pipe, image, prompt: str, a: list[int], b: list[int], tol: float = 1e-5) -> bool:
    """Whether the first divergence of greedy outputs `a` and `b` sits on a target logit tie within `tol`.

    `pipe` is a runtime `Pipeline` (its prompt embeddings, embedding table and engine's next-token logits).
    """
    i = first_divergence(a, b)
    if i >= min(len(a), len(b)):
        return False
    emb, _mask, _ = pipe.prompt_embeds(image, prompt)
    ctx = np.concatenate([emb, pipe.embed_table[np.array(a[:i], dtype=np.int64)]]) if i else emb
    pos = pipe.prompt_positions(image, prompt)
    if pos is not None:  # mRoPE: the answer's tokens continue after the prompt's largest position
        pos = np.concatenate([pos, np.broadcast_to(pos.max() + 1 + np.arange(i), (len(pos), i))], 1)
    logits = pipe.engine.next_logits(ctx, pos)
    return abs(float(logits[a[i]]) - float(logits[b[i]])) <= tol
