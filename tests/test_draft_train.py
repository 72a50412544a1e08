"""Draft data generation and distillation on the demo target: resumable, identity-checked, it learns."""

import json

import pytest
import torch

from dream_export.core.prompts import read_prompts
from dream_export.demo import data as demo_data
from dream_export.draft.config import DraftConfig
from dream_export.draft.data import DataConfig, FeatureDataset, generate_features
from dream_export.draft.train import DraftTrainConfig, load_draft, train_draft
from dream_export.errors import IncompatibleArtifactError


@pytest.fixture(scope="module")
def features(demo_target, tmp_path_factory):
    root = tmp_path_factory.mktemp("draftdata")
    rows = read_prompts(demo_data.write_split(root, "train", demo_data.train_split(12)))
    cfg = DataConfig(taps=(2, 12, 21), shard_size=8, max_new_tokens=48)
    generate_features(demo_target.model, demo_target.processor, rows, root / "feat", cfg, "demo", progress=False)
    return root, rows, cfg


def test_features_are_consistent_with_the_target(features, demo_target):
    root, rows, _ = features
    ds = FeatureDataset(root / "feat")
    assert len(ds) == len(rows)
    s = ds[0]
    t = len(s["input_ids"])
    assert s["final"].shape == (t, 128) and s["taps"].shape == (t, 3 * 128)
    assert int(s["image_mask"].sum()) == 10
    assert s["loss_mask"][: s["prompt_len"]].sum() == 0 and s["loss_mask"][s["prompt_len"]:].sum() == t - s["prompt_len"] - 1
    # the stored final features reproduce the target's own greedy answer through its LM head
    logits = demo_target.model.lm_head(s["final"].float())
    ans = s["input_ids"][s["prompt_len"]:]
    assert torch.equal(logits[s["prompt_len"] - 1: -1].argmax(-1), ans)
    # importance is a distribution over prompt positions
    assert abs(float(s["importance"][: s["prompt_len"]].sum()) - 1.0) < 1e-3


def test_rerun_resumes_and_mismatched_recipe_is_refused(features, demo_target):
    root, rows, cfg = features
    shards = sorted(p.stat().st_mtime_ns for p in (root / "feat").glob("shard-*"))
    generate_features(demo_target.model, demo_target.processor, rows, root / "feat", cfg, "demo", progress=False)
    assert sorted(p.stat().st_mtime_ns for p in (root / "feat").glob("shard-*")) == shards  # nothing redone
    with pytest.raises(IncompatibleArtifactError, match="another target or recipe"):
        generate_features(demo_target.model, demo_target.processor, rows, root / "feat",
                          DataConfig(mid_select="dream-s", taps=cfg.taps, shard_size=8, max_new_tokens=48), "demo",
                          progress=False)


@pytest.mark.parametrize("arch", ["dream", "eagle2", "eagle3"])
def test_training_improves_agreement_and_round_trips(features, demo_target, tmp_path, arch):
    root, _, _ = features
    cfg = DraftConfig.from_target(demo_target.model.config.text_config, arch=arch)
    tcfg = DraftTrainConfig(steps=40, batch_size=4, warmup=5, lr=2e-3, threads=2)
    draft, record = train_draft(root / "feat", demo_target.model.lm_head.weight, cfg, tcfg, out_dir=tmp_path / "d",
                                log=lambda _s: None, progress=False, holdout=4)
    hist = record["history"]
    assert hist[-1]["top1"] > 0.1  # 40 steps; an untrained draft agrees on ~1/vocab (0.002) of positions
    loaded = load_draft(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "training.json").read_text())["draft_config"]["arch"] == arch
    for k, v in draft.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_interrupted_training_resumes_to_the_same_weights(features, demo_target, tmp_path):
    from dream_export.draft import train as train_mod

    root, _, _ = features
    cfg = DraftConfig.from_target(demo_target.model.config.text_config)
    tcfg = DraftTrainConfig(steps=12, batch_size=2, warmup=2, threads=2)
    head = demo_target.model.lm_head.weight
    # OUT's parent does not exist yet: the checkpoint beside it must not fail (it did at step 6)
    full, _ = train_draft(root / "feat", head, cfg, tcfg, out_dir=tmp_path / "new" / "a", log=lambda _s: None,
                          progress=False, holdout=4, ckpt_every=6)
    assert (tmp_path / "new" / "a" / "model.safetensors").exists()

    class Interrupt(Exception):
        pass

    real_save = train_mod.save_draft

    def crash(*_a, **_k):
        raise Interrupt

    train_mod.save_draft = crash  # the run dies after its last checkpoint (step 6) was written
    try:
        with pytest.raises(Interrupt):
            train_draft(root / "feat", head, cfg, tcfg, out_dir=tmp_path / "b", log=lambda _s: None,
                        progress=False, holdout=4, ckpt_every=6)
    finally:
        train_mod.save_draft = real_save
    assert (tmp_path / ".b.resume.pt").exists() and not (tmp_path / "b").exists()
    resumed, _ = train_draft(root / "feat", head, cfg, tcfg, out_dir=tmp_path / "b", log=lambda _s: None,
                             progress=False, holdout=4, ckpt_every=6, resume=True)
    for k, v in full.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    assert not (tmp_path / ".b.resume.pt").exists()
