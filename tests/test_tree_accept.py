"""EAGLE-2 tree construction and acceptance rules (greedy exactness, sampling losslessness)."""

import numpy as np
import pytest
from scipy.stats import chisquare

from dream_export.runtime.accept import (
    SamplingParams,
    accept_greedy,
    accept_sampling,
    probs_from_logits,
    sample,
)
from dream_export.runtime.tree import TreeDraft, TreeSpec, VerifyTree


def _grow(spec, rng, vocab=20):
    t = TreeDraft(spec, root_token=0)
    frontier = t.expand(*_topk(rng, 1, spec.k, vocab))
    for _ in range(spec.depth - 1):
        frontier = t.expand(*_topk(rng, len(frontier), spec.k, vocab))
    return t


def _topk(rng, rows, k, vocab):
    lp = np.log(rng.dirichlet(np.ones(vocab), size=rows))
    ids = np.argsort(-lp, 1)[:, :k]
    return ids, np.take_along_axis(lp, ids, 1)


def test_tree_is_ancestor_closed_topological_and_sized():
    rng = np.random.default_rng(0)
    for spec in [TreeSpec(4, 6, 32), TreeSpec(2, 3, 7), TreeSpec(3, 5, 60)]:
        tree = _grow(spec, rng).finalize()
        assert len(tree) == min(spec.total, 1 + spec.k + (spec.depth - 1) * spec.k ** 2)
        assert tree.parents[0] == -1 and all(tree.parents[i] < i for i in range(1, len(tree)))
        assert tree.depths.max() <= spec.depth
        m = tree.ancestor_mask()
        for i in range(1, len(tree)):
            assert m[i, tree.parents[i]] and m[i, i] and m[i, 0]
            assert m[i].sum() == tree.depths[i] + 1  # exactly itself and its ancestors


def test_chain_is_a_path():
    rng = np.random.default_rng(1)
    tree = _grow(TreeSpec.chain(5), rng).finalize()
    assert len(tree) == 6
    assert list(tree.parents) == [-1, 0, 1, 2, 3, 4]


def test_tree_spec_parse_errors_are_clear():
    assert TreeSpec.parse("4,6,32") == TreeSpec(4, 6, 32)
    with pytest.raises(ValueError, match="K,DEPTH,TOTAL"):
        TreeSpec.parse("4x6")


def test_greedy_accepts_longest_matching_path_and_bonus():
    # root -> a(5) -> b(7); root -> c(6)
    tree = VerifyTree(tokens=np.array([0, 5, 6, 7]), parents=np.array([-1, 0, 0, 1]), depths=np.array([0, 1, 1, 2]))
    path, bonus = accept_greedy(tree, np.array([5, 7, 9, 3]))
    assert path == [0, 1, 3] and bonus == 3
    path, bonus = accept_greedy(tree, np.array([6, 0, 4, 0]))
    assert path == [0, 2] and bonus == 4
    path, bonus = accept_greedy(tree, np.array([8, 0, 0, 0]))
    assert path == [0] and bonus == 8


def test_top_p_top_k_filtering():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(p[0], [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-12)
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=1))
    np.testing.assert_allclose(p[0], [1, 0, 0, 0])


def _broken_accept(tree, probs, rng):
    """A plausible bug: accept any drafted child the target gives mass to (no rejection)."""
    children = tree.children()
    path, cur = [0], 0
    while True:
        nxt = next((c for c in children[cur] if probs[cur][tree.tokens[c]] > 0), None)
        if nxt is None:
            return path, sample(probs[cur], rng)
        path.append(nxt)
        cur = nxt


def _first_two_tokens(accept, n, seed):
    """Joint distribution of the first two tokens after the root under a fixed 3-token target."""
    rng = np.random.default_rng(seed)
    v = 3
    # target: next-token distribution depends on the previous token (a Markov chain)
    trans = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]])
    counts = np.zeros((v, v))
    for _ in range(n):
        # a draft tree that is wrong often: root(0) -> {1, 2}, 1 -> {1}, 2 -> {0, 2}
        tree = VerifyTree(tokens=np.array([0, 1, 2, 1, 0, 2]), parents=np.array([-1, 0, 0, 1, 2, 2]),
                          depths=np.array([0, 1, 1, 2, 2, 2]))
        probs = trans[tree.tokens]
        path, bonus = accept(tree, probs, rng)
        toks = [int(tree.tokens[i]) for i in path[1:]] + [bonus]
        while len(toks) < 2:  # continue plain sampling past the round, as the next round would
            toks.append(sample(trans[toks[-1]], rng))
        counts[toks[0], toks[1]] += 1
    expected = (trans[0][:, None] * trans) * n
    return counts.ravel(), expected.ravel()


def test_recursive_rejection_sampling_is_lossless():
    obs, exp = _first_two_tokens(accept_sampling, 20000, seed=0)
    assert chisquare(obs, exp).pvalue > 0.01


def test_broken_acceptance_rule_is_detected():
    obs, exp = _first_two_tokens(_broken_accept, 20000, seed=0)
    assert chisquare(obs, exp).pvalue < 1e-6
