"""EAGLE-3 style drafts: trained on the demo target's layer taps, exported with the taps' fuse inside the
draft graph, lossless on ONNX Runtime (tree and chain) and equal to the torch draft and reference decoder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dream_export.demo import scenes

try:
    from tests.draft_fixture import assert_lossless_and_equal_to_reference, demo_features, heldout
except ImportError:  # pragma: no cover
    from draft_fixture import assert_lossless_and_equal_to_reference, demo_features, heldout

DEMO = Path(__file__).resolve().parents[1] / "dream_export" / "assets" / "demo"
PROMPTS = 3


def _first_prompt():
    scene, s = heldout(1)[0]
    return scenes.render(scene), s.prompt


@pytest.fixture(scope="module")
def trained(demo_target, tmp_path_factory):
    """An EAGLE-3 draft trained a few steps on demo features with the low / middle / high layer taps."""
    from dream_export.draft.config import DraftConfig
    from dream_export.draft.train import DraftTrainConfig, train_draft

    root = tmp_path_factory.mktemp("eagle3")
    cfg = DraftConfig.from_target(demo_target.model.config.text_config, arch="eagle3")
    feats = demo_features(demo_target, root, taps=tuple(cfg.fuse_layers))
    tcfg = DraftTrainConfig(steps=40, batch_size=4, warmup=5, lr=2e-3, threads=2)
    draft, _ = train_draft(feats, demo_target.model.lm_head.weight, cfg, tcfg, out_dir=root / "draft",
                           log=lambda _s: None, progress=False, holdout=2)
    return root / "draft", draft


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    from dream_export.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("eagle3-bundle") / "bundle"
    export_bundle(DEMO / "vlm", trained[0], out, ExportOptions(kv_capacity=256, max_tree=64), log=lambda _s: None)
    return out


def test_draft_graph_takes_the_taps_and_fuses_them(bundle, trained, demo_target):
    """The draft graph reads the target's taps (3 × hidden) as `prev_taps` and its own features as
    `prev_feat`; fed taps, it computes what the torch draft computes on the fused feature."""
    import onnxruntime as ort

    from dream_export.export.graphs import DraftGraph

    m = json.loads((bundle / "manifest.json").read_text())
    entry = m["graphs"]["draft"]
    shapes = {io["name"]: io["shape"] for io in entry["inputs"]}
    h = m["dims"]["hidden"]
    assert shapes["prev_taps"] == [1, "tokens", 3 * h] and shapes["prev_feat"] == [1, "tokens", h]
    assert {"prev_feat", "prev_taps"} <= set(entry["bindings"])
    assert [o["shape"][-1] for o in m["graphs"]["target"]["outputs"] if o["name"] == "taps"] == [3 * h]

    draft = trained[1]
    rng = np.random.default_rng(0)
    t, cap, d = 4, m["draft_capacity"], m["dims"]
    kv = np.zeros((d["draft_blocks"], 1, d["draft_kv_heads"], cap, d["draft_head_dim"]), np.float32)
    feeds = {"embeds": rng.standard_normal((1, t, h)).astype(np.float32) * 0.05,
             "positions": np.arange(t)[None], "self_mask": np.zeros((1, t, cap + t), bool),
             "self_key": kv, "self_value": kv,
             "new_feats": np.zeros((1, 0, h), np.float32), "prev_feat": np.zeros((1, t, h), np.float32),
             "prev_taps": rng.standard_normal((1, t, 3 * h)).astype(np.float32)}
    feeds["self_mask"][0, :, cap:] = np.tril(np.ones((t, t), bool))
    sess = ort.InferenceSession(str(bundle / entry["file"]), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()}), strict=True))
    # the torch draft graph fed the feature fused outside, as training computes it
    graph = DraftGraph(draft, demo_target.model.lm_head, m["topk"]).eval()
    with torch.no_grad():
        fused = draft.target_feature(None, [torch.from_numpy(feeds["prev_taps"])])
        no_cross = torch.zeros(1, d["draft_kv_heads"], 0, d["draft_head_dim"])
        want = graph(*(torch.from_numpy(feeds[k]) for k in ("embeds", "positions", "self_mask", "self_key",
                                                             "self_value")),
                     no_cross, no_cross, torch.from_numpy(feeds["new_feats"]), torch.ones(1, t, 0, dtype=torch.bool),
                     fused)
    scale = float(np.abs(want[0].numpy()).max())
    assert np.abs(got["feature"] - want[0].numpy()).max() <= 1e-4 * scale
    assert np.array_equal(got["topk_ids"][:, 0], want[1].numpy()[:, 0])


def test_parity_check_covers_the_fused_draft_graph(bundle):
    from dream_export.export.parity import check_bundle

    report = check_bundle(bundle, variants=("fp32",), seeds=(0,), log=lambda *_: None, samples=[_first_prompt()])
    assert report["ok"], report["failures"]
    cases = report["graphs"]["draft"]["fp32"]["cases"]
    assert {"realistic-context", "realistic-tree", "random-seed0"} <= set(cases)


def test_onnx_runtime_output_equals_the_target_and_the_reference(bundle, trained):
    from dream_export.draft.target import load_target
    from dream_export.runtime.pipeline import Pipeline

    # the reference decoder reads the taps from the target's decoder, loaded to expose them
    target = load_target(DEMO / "vlm", taps=tuple(trained[1].config.fuse_layers))
    taus = assert_lossless_and_equal_to_reference(Pipeline.load(bundle, threads=2), target, trained[1], PROMPTS,
                                                  eagle3_taps=True)
    assert min(taus) > 1.0  # the draft's tokens are accepted, not only the target's own
