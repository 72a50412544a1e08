"""Greedy speculative decoding with the demo draft reproduces the target's own greedy output exactly."""

import pytest
import torch

from dream_export.core.prompts import PromptEncoder
from dream_export.demo import scenes
from dream_export.draft.reference import generate
from dream_export.runtime.tree import TreeSpec


def _check(demo_target, demo_draft, samples):
    enc = PromptEncoder(demo_target.processor)
    for scene, s in samples:
        img = scenes.render(scene)
        inputs = enc.encode([img], [s.prompt])
        with torch.no_grad():
            hf = demo_target.model.generate(**inputs, max_new_tokens=128, do_sample=False)
        hf_tokens = hf[0, inputs["input_ids"].shape[1]:].tolist()
        emb, _ = demo_target.prompt_embeds(img, s.prompt)
        for mode in ("tree", "chain"):
            g = generate(demo_target.side, emb, 128, draft=demo_draft, mode=mode, spec=TreeSpec(4, 6, 32),
                         eos_id=demo_target.eos_id)
            assert g.tokens == hf_tokens, (mode, s.prompt)


def test_speculative_greedy_equals_hf_greedy(demo_target, demo_draft):
    _check(demo_target, demo_draft, scenes.heldout(1))


@pytest.mark.slow
def test_speculative_greedy_equals_hf_greedy_on_all_heldout(demo_target, demo_draft):
    _check(demo_target, demo_draft, scenes.heldout(20))
