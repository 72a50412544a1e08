"""What the tests of a draft kind trained on the demo target share: held-out scenes and a small feature set."""

from __future__ import annotations

from pathlib import Path

from dream_export.demo import scenes


def heldout(n: int) -> list:
    """`n` held-out (scene, sample) pairs spread over the demo's tasks."""
    data = scenes.heldout(max(1, n // len(scenes.TASKS) + 1))
    return data[:: max(1, len(data) // n)][:n]


def demo_features(target, root: Path, taps: tuple[int, ...] = ()) -> Path:
    """Draft training features of 8 demo training prompts answered by `target` (with layer `taps`)."""
    from dream_export.core.prompts import read_prompts
    from dream_export.demo import data as demo_data
    from dream_export.draft.data import DataConfig, generate_features

    rows = read_prompts(demo_data.write_split(root, "train", demo_data.train_split(8)))
    generate_features(target.model, target.processor, rows, root / "feat",
                      DataConfig(taps=taps, shard_size=8, max_new_tokens=32), "demo", progress=False)
    return root / "feat"


def assert_lossless_and_equal_to_reference(pipe, target, draft, prompts: int, eagle3_taps: bool = False
                                           ) -> list[float]:
    """On `prompts` held-out scenes, the bundle's speculative greedy output (tree 4,6,32 and chain) equals
    its autoregressive output and the torch reference decoder's, with the reference's τ; returns the τs."""
    import pytest

    from dream_export.draft.reference import generate
    from dream_export.runtime.tree import TreeSpec

    tree, taus = TreeSpec(4, 6, 32), []
    for scene, s in heldout(prompts):
        img = scenes.render(scene)
        ar = pipe.generate(img, s.prompt, max_new_tokens=32, mode="ar").tokens
        emb, _ = target.prompt_embeds(img, s.prompt)
        for mode in ("tree", "chain"):
            res = pipe.generate(img, s.prompt, max_new_tokens=32, mode=mode, tree=tree)
            ref = generate(target.side, emb, 32, draft=draft, mode=mode, spec=tree, eos_id=target.eos_id,
                           eagle3_taps=eagle3_taps)
            assert res.tokens == ar == ref.tokens, mode
            assert res.stats["tau"] == pytest.approx(ref.tau)
            taus.append(res.stats["tau"])
    return taus
