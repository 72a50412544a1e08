"""Self-speculative drafts: trained on the demo target's features, lossless in the torch reference and on
ONNX Runtime, exported with the target's layers stored once, refused with a clear error for a bad exit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dream_export.demo import scenes
from dream_export.draft.reference import generate
from dream_export.runtime.tree import TreeSpec

try:
    from tests.draft_fixture import assert_lossless_and_equal_to_reference, demo_features, heldout
except ImportError:  # pragma: no cover
    from draft_fixture import assert_lossless_and_equal_to_reference, demo_features, heldout

DEMO = Path(__file__).resolve().parents[1] / "dream_export" / "assets" / "demo"
EXIT = 6
PROMPTS = 3


@pytest.fixture(scope="module")
def trained(demo_target, tmp_path_factory):
    """A self-spec draft (exit after layer EXIT, one imitation block) trained a few steps on demo features."""
    from dream_export.draft.config import DraftConfig
    from dream_export.draft.selfspec_train import train_selfspec
    from dream_export.draft.train import DraftTrainConfig

    root = tmp_path_factory.mktemp("selfspec")
    feats = demo_features(demo_target, root)
    cfg = DraftConfig.from_target(demo_target.model.config.text_config, arch="self-spec", exit_layer=EXIT)
    tcfg = DraftTrainConfig(steps=12, batch_size=4, warmup=2, lr=1e-3, self_feed=False, threads=2)
    draft, record = train_selfspec(feats, demo_target, cfg, tcfg, out_dir=root / "draft",
                                   log=lambda _s: None, progress=False, holdout=2)
    return root / "draft", draft, record


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    from dream_export.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("selfspec-bundle") / "bundle"
    export_bundle(DEMO / "vlm", trained[0], out, ExportOptions(kv_capacity=256, max_tree=64), log=lambda _s: None)
    return out


def test_draft_saves_only_the_imitation_network(trained, demo_target):
    from safetensors import safe_open

    from dream_export.draft.train import load_draft

    path, draft, record = trained
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("imitation.", "norm.")) for k in keys)
    assert record["history"][-1]["top1"] > 0.3
    loaded = load_draft(path, demo_target)
    assert len(loaded.blocks) == EXIT + 1
    # the shared layers are the target's own modules, not copies
    assert loaded.blocks[0] is demo_target.side.decoder.lm.layers[0]


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_reference_greedy_output_equals_the_target_alone(trained, demo_target, mode):
    draft = trained[1]
    for scene, s in heldout(PROMPTS):
        emb, _ = demo_target.prompt_embeds(scenes.render(scene), s.prompt)
        ar = generate(demo_target.side, emb, 32, mode="ar", eos_id=demo_target.eos_id)
        spec = generate(demo_target.side, emb, 32, draft=draft, mode=mode, spec=TreeSpec(4, 6, 32),
                        eos_id=demo_target.eos_id)
        assert spec.tokens == ar.tokens
        assert spec.tau > 1.0


def test_onnx_runtime_output_equals_the_target_and_the_reference(bundle, trained, demo_target):
    from dream_export.runtime.pipeline import Pipeline

    assert_lossless_and_equal_to_reference(Pipeline.load(bundle, threads=2), demo_target, trained[1], PROMPTS)


def test_bundle_grows_by_the_imitation_network_only(bundle, trained):
    import onnx

    m = json.loads((bundle / "manifest.json").read_text())
    assert m["draft"]["arch"] == "self-spec" and m["draft"]["exit_layer"] == EXIT
    assert m["dims"]["draft_blocks"] == EXIT + 1  # the draft's cache: the shared layers' rows, then its own
    onnx_dir = bundle / "onnx"
    imitation = sum(v.numel() * 4 for v in trained[1].state_dict().values())  # fp32 in the graphs
    # what the draft adds to the bundle is its graph file (no data file of its own)
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["draft.onnx", "target.onnx", "target.onnx.data",
                                                          "vision.onnx"]
    # the imitation weights, plus the graph's nodes and sub-kilobyte constants (norm scales): ~12 KB a layer
    assert (onnx_dir / "draft.onnx").stat().st_size <= imitation + 16 * 1024 * (EXIT + 1) + 64 * 1024
    # every shared layer's weights (and the LM head) are read from the target's data file
    graph = onnx.load(str(onnx_dir / "draft.onnx"), load_external_data=False)
    shared = sum(int(next(e.value for e in t.external_data if e.key == "length")) for t in graph.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL)
    layer = sum(p.numel() * 4 for p in trained[1].blocks[0].parameters())
    assert shared >= EXIT * layer * 0.95
    assert shared == m["draft"]["shared_bytes"]


def test_memory_plan_counts_the_shared_layers_and_their_cache(trained):
    from dream_export.targets.memory import DraftDesc, describe_model, estimate

    model = describe_model(json.loads((DEMO / "vlm" / "config.json").read_text()))
    cfg = json.loads((trained[0] / "draft_config.json").read_text())
    desc = DraftDesc.from_config(cfg)
    assert (desc.num_blocks, desc.shared_layers, desc.attention_blocks) == (1, EXIT, EXIT + 1)
    plan = estimate(model, "cpu", "fp32", 256, 32, desc).breakdown()
    one = estimate(model, "cpu", "fp32", 256, 32, DraftDesc.from_config({**cfg, "exit_layer": 1})).breakdown()
    assert plan["draft_weights"] > one["draft_weights"] and plan["draft_cache"] > one["draft_cache"]


@pytest.mark.parametrize("bad", ["0", "24"])
def test_bad_exit_layer_is_a_clear_error(tmp_path, bad):
    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "prompt": "hi"}\n')
    r = subprocess.run([sys.executable, "-m", "dream_export.cli", "train-draft", str(DEMO / "vlm"), "--data",
                        str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "out"), "--arch", "self-spec",
                        "--exit-layer", bad], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert f"--exit-layer {bad} is out of range" in r.stderr and "layers 1..23" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_cpu_build_carries_its_own_weights_and_stays_lossless(bundle, tmp_path):
    """`build --target cpu` of a bundle whose draft reads the target's data file: the built graphs load
    from their own files, and greedy output stays the target's."""
    import shutil

    from dream_export.runtime.pipeline import Pipeline

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    r = subprocess.run([sys.executable, "-m", "dream_export.cli", "build", str(b), "--target", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plan = json.loads((b / "engines" / "cpu" / "build.json").read_text())
    assert set(plan["graphs"]) == {"vision", "target", "draft"} and plan["draft_weights"]["weights"] == "int8"
    import onnx

    # the CPU variant does not reach back into the exported graphs' data file
    for name in plan["graphs"]:
        graph = onnx.load(str(b / "engines" / "cpu" / f"{name}.onnx"), load_external_data=False)
        assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} <= {
            f"{name}.onnx.data"}
        assert (b / "engines" / "cpu" / f"{name}.onnx.data").exists() == (name == "target")
    pipe = Pipeline.load(b, precision="cpu", threads=2)
    for scene, s in heldout(PROMPTS):
        img = scenes.render(scene)
        ar = pipe.generate(img, s.prompt, max_new_tokens=32, mode="ar").tokens
        for mode in ("tree", "chain"):
            assert pipe.generate(img, s.prompt, max_new_tokens=32, mode=mode, tree=TreeSpec(4, 6, 32)).tokens == ar
