"""Property tests of the tree builder and acceptance: random trees and random target outputs.

The invariants the speculative loop relies on for lossless output: the tree the target verifies is
ancestor-closed and topologically ordered, the accepted path is a root-first ancestor chain of it, greedy
acceptance is exactly the walk along the target's argmax, and committing the accepted rows keeps those
rows and no others.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dream_export.runtime.accept import accept_greedy, accept_sampling
from dream_export.runtime.tree import TreeDraft, TreeSpec, VerifyTree

VOCAB = 7  # small, so random drafts often agree with the target and paths get long

specs = st.builds(lambda k, d, extra: TreeSpec(k, d, min(1 + k * d, 2 + extra)),
                  st.integers(1, 4), st.integers(1, 5), st.integers(0, 20))


@st.composite
def drafted_trees(draw) -> tuple[TreeSpec, VerifyTree]:
    """A tree grown by `TreeDraft` from random draft top-k outputs, the way a round grows it."""
    spec = draw(specs)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tree = TreeDraft(spec, int(rng.integers(VOCAB)))
    frontier = tree.frontier
    for _ in range(spec.depth):
        # per frontier node: k distinct tokens, log-probs sorted best first (as a draft's top-k)
        ids = np.stack([rng.permutation(VOCAB)[: spec.k] for _ in frontier])
        lp = -np.sort(rng.exponential(1.0, size=(len(frontier), spec.k)), axis=1)
        if draw(st.booleans()):  # ties at log p = 0 (a confident draft), the case finalize guards
            lp[:, 0] = 0.0
        frontier = tree.expand(ids, lp)
    return spec, tree.finalize()


def _is_ancestor_chain(tree: VerifyTree, path: list[int]) -> bool:
    return path[0] == 0 and all(tree.parents[b] == a for a, b in zip(path, path[1:], strict=False))


def _argmax_walk(tree: VerifyTree, argmax: np.ndarray) -> tuple[list[int], int]:
    """Greedy acceptance written independently: follow the first child (tree order) matching the target."""
    path = [0]
    while True:
        want = int(argmax[path[-1]])
        kids = [i for i in range(1, len(tree)) if tree.parents[i] == path[-1] and tree.tokens[i] == want]
        if not kids:
            return path, want
        path.append(kids[0])


@settings(max_examples=300, deadline=None)
@given(drafted_trees())
def test_finalized_tree_is_ancestor_closed_and_topological(case):
    spec, tree = case
    assert 2 <= len(tree) <= spec.total
    assert tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, len(tree)):
        p = tree.parents[i]
        assert 0 <= p < i, "a node's parent is verified before it (topological order)"
        assert tree.depths[i] == tree.depths[p] + 1
        assert tree.depths[i] <= spec.depth
    # the mask row of every node is exactly itself and its ancestors
    m = tree.ancestor_mask()
    for i in range(len(tree)):
        anc, p = {i}, tree.parents[i]
        while p >= 0:
            anc.add(int(p))
            p = tree.parents[p]
        assert set(np.flatnonzero(m[i]).tolist()) == anc


@settings(max_examples=300, deadline=None)
@given(drafted_trees(), st.integers(0, 2**32 - 1))
def test_greedy_acceptance_is_the_targets_argmax_walk(case, seed):
    _, tree = case
    rng = np.random.default_rng(seed)
    # a target that mostly agrees with the draft, so accepted paths are long as well as short
    argmax = np.where(rng.random(len(tree)) < 0.7, np.roll(tree.tokens, -1), rng.integers(VOCAB, size=len(tree)))
    path, bonus = accept_greedy(tree, argmax)
    assert _is_ancestor_chain(tree, path)
    assert (path, bonus) == _argmax_walk(tree, argmax)
    assert bonus == argmax[path[-1]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=12), st.integers(0, 2**32 - 1))
def test_chain_fast_path_equals_the_general_walk(tokens, seed):
    chain = VerifyTree.chain(tokens)
    assert chain.is_chain
    rng = np.random.default_rng(seed)
    argmax = np.where(rng.random(len(chain)) < 0.8, np.roll(chain.tokens, -1), rng.integers(VOCAB, size=len(chain)))
    assert accept_greedy(chain, argmax) == _argmax_walk(chain, argmax)


@settings(max_examples=200, deadline=None)
@given(drafted_trees(), st.integers(0, 2**32 - 1))
def test_sampling_acceptance_path_and_bonus_are_possible(case, seed):
    _, tree = case
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(VOCAB, 0.3), size=len(tree))
    probs[probs < 0.05] = 0.0  # tokens the target can never produce
    probs /= probs.sum(-1, keepdims=True)
    path, bonus = accept_sampling(tree, probs, np.random.default_rng(seed))
    assert _is_ancestor_chain(tree, path)
    for a, b in zip(path, path[1:], strict=False):
        assert probs[a, tree.tokens[b]] > 0, "an accepted token has positive target probability"
    # the bonus is drawn from the residual at the last node: never a token the target excludes there,
    # never a child token that was tried and rejected
    assert probs[path[-1], bonus] > 0


@settings(max_examples=200, deadline=None)
@given(drafted_trees(), st.integers(0, 2**32 - 1))
def test_commit_keeps_exactly_the_accepted_rows(case, seed):
    """KV rollback by compaction: the accepted rows land, in path order, right after the committed prefix,
    and no rejected row is written."""
    from dream_export.runtime.masks import row_index

    _, tree = case
    rng = np.random.default_rng(seed)
    argmax = np.where(rng.random(len(tree)) < 0.7, np.roll(tree.tokens, -1), rng.integers(VOCAB, size=len(tree)))
    path, _ = accept_greedy(tree, argmax)
    new_rows = np.arange(len(tree)) * 10 + 1  # row i of this call's output is recognisable as 10*i + 1
    at, cap = 5, 5 + len(tree) + 3
    cache = np.full(cap, -1)
    idx = np.array(path)
    cache[at:at + len(idx)] = new_rows[row_index(idx)]
    assert cache[at:at + len(idx)].tolist() == [10 * i + 1 for i in path]
    assert (cache[:at] == -1).all() and (cache[at + len(idx):] == -1).all()
