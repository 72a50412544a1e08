"""EAGLE-2 dynamic draft trees in numpy: expansion, reranking, masks for drafting and verification.

Shared by the torch reference decoder and the torch-free runtime, so both build the same trees.

Bookkeeping: node 0 is the root (the token the target produced last; it is verified as the first row
of the tree). Layer 1 is the top-k of the draft at the root; each later step runs the k frontier nodes
through the draft, scores their k children by cumulative log-probability and keeps the best k as the
next frontier. After `depth` layers, the `total - 1` best nodes overall (an ancestor-closed set,
since a child's cumulative log-probability never exceeds its parent's) form the tree the target
verifies. A chain is the same tree with k = 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TreeSpec:
    """Tree shape: children per node (k), layers of draft tokens (depth), nodes verified (total, root included).

    `depth` counts every layer of draft tokens. DREAM's and EAGLE's `topK_genrate` count one fewer (their
    context pass drafts the first layer, then `depth` more), so their depth 6 is 4,7,32 here and this
    default 4,6,32 drafts one layer less than the papers' code.
    """

    k: int = 4
    depth: int = 6
    total: int = 32

    def __post_init__(self) -> None:
        if self.k < 1 or self.depth < 1 or self.total < 2:
            raise ValueError(f"tree needs k >= 1, depth >= 1, total >= 2 (got {self})")

    @classmethod
    def chain(cls, depth: int) -> TreeSpec:
        return cls(k=1, depth=depth, total=depth + 1)

    @classmethod
    def parse(cls, text: str) -> TreeSpec:
        """'K,DEPTH,TOTAL' as given on the command line."""
        try:
            k, d, n = (int(v) for v in text.split(","))
        except ValueError as e:
            raise ValueError(f"tree must be K,DEPTH,TOTAL (e.g. 4,6,32), got {text!r}") from e
        return cls(k, d, n)


class TreeDraft:
    """Grows one round's candidate tree; the caller runs the draft model on `frontier` each step."""

    def __init__(self, spec: TreeSpec, root_token: int):
        self.spec = spec
        self.tokens = [int(root_token)]
        self.parents = [-1]
        self.depths = [0]
        self.scores = [0.0]
        self.frontier: list[int] = [0]

    def expand(self, ids: np.ndarray, logprobs: np.ndarray) -> list[int]:
        """Add the top-k children of each frontier node; keep the best k as the new frontier.

        `ids`, `logprobs`: [len(frontier), k] the draft's top-k per frontier node (best first).
        Returns the new frontier (node indices), in the order the draft must run them.
        """
        k = self.spec.k
        cand = []
        for row, parent in enumerate(self.frontier):
            for j in range(min(k, ids.shape[1])):
                cand.append((self.scores[parent] + float(logprobs[row, j]), parent, int(ids[row, j])))
        # stable sort: ties keep the draft's own order (parent order, then rank)
        order = sorted(range(len(cand)), key=lambda i: -cand[i][0])
        new_nodes = []
        for i in order:
            s, parent, tok = cand[i]
            self.tokens.append(tok)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.scores.append(s)
            new_nodes.append(len(self.tokens) - 1)
        self.frontier = new_nodes[:k]
        return self.frontier

    def ancestors(self, node: int) -> list[int]:
        """Node's ancestors from the root down, excluding itself."""
        out = []
        p = self.parents[node]
        while p >= 0:
            out.append(p)
            p = self.parents[p]
        return out[::-1]

    def finalize(self) -> VerifyTree:
        """Pick the `total` best nodes (root included) and lay them out for verification."""
        n = len(self.tokens)
        keep = sorted(range(1, n), key=lambda i: (-self.scores[i], self.depths[i], i))[: self.spec.total - 1]
        chosen = set(keep) | {0}
        for i in keep:  # ancestor closure holds mathematically; this guards float ties at log p = 0
            chosen.update(self.ancestors(i))
        order = sorted(chosen, key=lambda i: (self.depths[i], -self.scores[i], i))
        index = {old: new for new, old in enumerate(order)}
        parents = np.array([index[self.parents[i]] if i else -1 for i in order], dtype=np.int64)
        return VerifyTree(tokens=np.array([self.tokens[i] for i in order], dtype=np.int64), parents=parents,
                          depths=np.array([self.depths[i] for i in order], dtype=np.int64))


@functools.lru_cache(maxsize=64)
def causal(n: int) -> np.ndarray:
    """[n,n] bool lower triangle (read-only, shared): each row sees itself and the rows before it."""
    m = np.tril(np.ones((n, n), dtype=bool))
    m.flags.writeable = False
    return m


@dataclass
class VerifyTree:
    """A candidate tree in topological order (root first)."""

    tokens: np.ndarray
    parents: np.ndarray
    depths: np.ndarray

    @classmethod
    def chain(cls, tokens: list[int]) -> VerifyTree:
        """A single path: root then one draft token per depth."""
        n = len(tokens)
        return cls(tokens=np.array(tokens, dtype=np.int64), parents=np.arange(-1, n - 1, dtype=np.int64),
                   depths=np.arange(n, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def is_chain(self) -> bool:
        """Whether every node's parent is the node before it (a single path); asked twice per round."""
        return bool(np.array_equal(self.parents, np.arange(-1, len(self) - 1)))

    def ancestor_mask(self) -> np.ndarray:
        """[N,N] bool: row i sees node j iff j is i or an ancestor of i (read-only for a chain)."""
        n = len(self)
        if self.is_chain:
            return causal(n)  # every CPU round: a shared triangle, not a Python loop
        m = np.eye(n, dtype=bool)
        for i in range(1, n):
            m[i] |= m[self.parents[i]]
        return m

    def children(self) -> list[list[int]]:
        """Children of every node, in tree order (which is best-draft-score first within a depth)."""
        ch: list[list[int]] = [[] for _ in range(len(self))]
        for i in range(1, len(self)):
            ch[self.parents[i]].append(i)
        return ch


def draft_step_masks(tree: TreeDraft, frontier: list[int], run_slot: dict[int, int], feat_slot: dict[int, int],
                     n_self_scratch: int, n_cross_scratch: int) -> tuple[np.ndarray, np.ndarray]:
    """Scratch-row visibility for one tree step of the draft.

    `run_slot[node]`: the node's row in the draft's self-attention scratch (nodes already run, plus the
    frontier being run now); `feat_slot[node]`: the row holding the node's predicted draft feature in
    the cross-attention scratch. Each frontier node sees itself and its ancestors only; this is the
    tree mask the upstream code forgot on the cross-attention side.
    Returns (self_scratch_mask [F, n_self_scratch], cross_scratch_mask [F, n_cross_scratch]).
    """
    sm = np.zeros((len(frontier), n_self_scratch), dtype=bool)
    cm = np.zeros((len(frontier), n_cross_scratch), dtype=bool)
    for r, node in enumerate(frontier):
        for a in tree.ancestors(node) + [node]:
            if a in run_slot:
                sm[r, run_slot[a]] = True
        for a in tree.ancestors(node):
            if a in feat_slot:
                cm[r, feat_slot[a]] = True
    return sm, cm
