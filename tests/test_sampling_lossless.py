"""Speculative sampling is lossless on a small-vocabulary model: the output distribution equals the target's."""

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from dream_export.draft.config import DraftConfig
from dream_export.draft.model import Draft, init_weights
from dream_export.draft.reference import TargetSide, generate
from dream_export.modeling.decoder import TargetDecoder
from dream_export.runtime import accept as accept_mod
from dream_export.runtime.accept import SamplingParams
from dream_export.runtime.tree import TreeSpec

try:
    from tests.test_tree_accept import _broken_accept
except ImportError:  # pragma: no cover
    from test_tree_accept import _broken_accept

VOCAB = 6


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(20)  # peaked enough that drafts are often right, flat enough to sample
    side = TargetSide(TargetDecoder(lm.model), lm.model.embed_tokens, lm.lm_head)
    draft = Draft(DraftConfig.from_target(cfg))
    init_weights(draft)
    draft.eval()
    prompt = torch.randn(1, 5, 32)
    return side, draft, prompt


def _first_tokens(side, draft, prompt, n, mode, seed0):
    out = np.zeros((3, VOCAB), dtype=np.int64)
    params = dict(temperature=1.0, top_p=0.9)
    for i in range(n):
        sp = SamplingParams(seed=seed0 + i, **params)
        if mode == "ar":
            toks = generate(side, prompt, 3, mode="ar", sampling=sp).tokens
        else:
            toks = generate(side, prompt, 3, draft=draft, mode="tree", spec=TreeSpec(2, 3, 6), sampling=sp).tokens
        for j, t in enumerate(toks[:3]):
            out[j, t] += 1
    return out


def _same_distribution(a, b) -> float:
    pvals = []
    for j in range(3):
        keep = (a[j] + b[j]) > 0
        pvals.append(chi2_contingency(np.stack([a[j][keep], b[j][keep]]))[1])
    return min(pvals) * 3  # Bonferroni over the three positions


@pytest.mark.slow
def test_speculative_sampling_matches_plain_sampling(tiny):
    side, draft, prompt = tiny
    ar = _first_tokens(side, draft, prompt, 3000, "ar", 0)
    sp = _first_tokens(side, draft, prompt, 3000, "tree", 10_000)
    assert _same_distribution(ar, sp) > 0.01


@pytest.mark.slow
def test_broken_acceptance_is_caught_by_the_same_test(tiny, monkeypatch):
    side, draft, prompt = tiny
    ar = _first_tokens(side, draft, prompt, 3000, "ar", 0)
    import dream_export.draft.reference as ref

    monkeypatch.setattr(ref, "accept_sampling", _broken_accept)
    sp = _first_tokens(side, draft, prompt, 3000, "tree", 10_000)
    assert _same_distribution(ar, sp) < 0.01
    assert accept_mod.accept_sampling is not _broken_accept  # the runtime's rule itself was never touched
