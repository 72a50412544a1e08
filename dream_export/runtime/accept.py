"""Verification: which drafted tokens the target accepts, greedy or lossless sampling (numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dream_export.errors import UsageError
from dream_export.runtime.tree import VerifyTree


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters.

    The one place sampling options are validated (the CLI, the Python API and the server all build
    one): an invalid value raises `UsageError` naming the option and the value.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(option: str, value, want: str) -> UsageError:
            return UsageError(f"{option} (--{option.replace('_', '-')}) must be {want}, got {value!r}")

        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "a number >= 0 (0: greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1] (1: no nucleus filter)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0: no top-k filter)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "an integer in [0, 2^63)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probs_from_logits(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The target distribution after temperature, top-k and top-p (rows of `logits`)."""
    z = np.asarray(logits, dtype=np.float64) / max(p.temperature, 1e-8)
    if p.top_k and p.top_k < z.shape[-1]:
        kth = np.partition(z, -p.top_k, axis=-1)[..., -p.top_k, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(-1, keepdims=True)
    if p.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop_sorted = (np.cumsum(sorted_p, -1) - sorted_p) >= p.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability vector."""
    c = np.cumsum(probs)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(probs) - 1))


def accept_greedy(tree: VerifyTree, target_argmax: np.ndarray) -> tuple[list[int], int]:
    """Longest path whose tokens equal the target's argmax at each parent; plus the bonus token.

    Returns (accepted node indices, root first; bonus token id).
    """
    if tree.is_chain:  # the first disagreement ends the path
        agree = tree.tokens[1:] == target_argmax[:-1]
        a = len(agree) if agree.all() else int(np.argmin(agree))
        return list(range(a + 1)), int(target_argmax[a])
    children = tree.children()
    path, cur = [0], 0
    while True:
        want = int(target_argmax[cur])
        nxt = next((c for c in children[cur] if tree.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        cur = nxt


def accept_sampling(tree: VerifyTree, target_probs: np.ndarray, rng: np.random.Generator) -> tuple[list[int], int]:
    """Multi-candidate recursive rejection sampling with deterministic (top-k) drafts: lossless.

    At each accepted node the distinct child tokens are tried in draft order; a child x is accepted
    with probability p(x) under the current residual p, else p(x) is zeroed and p renormalised. When
    every child is rejected (or the node is a leaf), the bonus token is drawn from the residual, so
    the output distribution equals sampling from the target alone.
    """
    children = tree.children()
    path, cur = [0], 0
    while True:
        p = np.array(target_probs[cur], dtype=np.float64)
        moved = False
        seen = set()
        for c in children[cur]:
            tok = int(tree.tokens[c])
            if tok in seen:
                continue
            seen.add(tok)
            mass = p.sum()
            if mass <= 0:
                break
            if rng.random() < p[tok] / mass:
                path.append(c)
                cur = c
                moved = True
                break
            p[tok] = 0.0
        if not moved:
            return path, sample(p / p.sum(), rng)
