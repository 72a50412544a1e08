"""FP16 variants of a bundle and numerical parity of every graph against its torch module."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dream_export.demo.scenes import rendered_samples
from dream_export.export.fp16 import convert_bundle
from dream_export.export.parity import GREEDY_PROMPTS, TOLERANCE, check_bundle

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from bundle_fixture import cached_tiny_bundle

GRAPHS = ("vision", "target", "draft")
SAMPLES = rendered_samples(GREEDY_PROMPTS)  # realistic feeds and greedy agreement


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    """A private copy of the tiny bundle with its FP16 variants (the cached original stays as exported)."""
    src = cached_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))
    # the bundle with its source checkpoints beside it, as the manifest records them (relative paths)
    pair = tmp_path_factory.mktemp("fp16") / "pair"
    shutil.copytree(src.parent, pair)
    dst = pair / "bundle"
    before = json.loads((dst / "manifest.json").read_text())
    summary = convert_bundle(dst, log=lambda *_: None)
    return dst, before, summary


def _io(path):
    m = onnx.load(str(path), load_external_data=False)
    return [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]


def test_fp16_variants_registered_and_io_unchanged(fp16_bundle):
    root, before, summary = fp16_bundle
    after = json.loads((root / "manifest.json").read_text())
    for name in GRAPHS:
        var = after["graphs"][name].pop("variants")["fp16"]
        assert var["file"] == f"onnx-fp16/{name}.onnx" and len(var["sha256"]) == 64
        assert _io(root / var["file"]) == _io(root / before["graphs"][name]["file"])  # keep_io_types
        weights = onnx.load(str(root / var["file"])).graph.initializer
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    # the integrity record gains the variant's files (Bundle.open checks their sizes, check their digests)
    added = {k: after["files"].pop(k) for k in list(after["files"]) if k.startswith("onnx-fp16/")}
    assert {f"onnx-fp16/{name}.onnx" for name in GRAPHS} <= set(added)
    assert all(v["bytes"] == (root / k).stat().st_size for k, v in added.items())
    assert after == before  # nothing but the variants changed
    # the kept nodes really compute in FP32 in the written graph
    model = onnx.shape_inference.infer_shapes(onnx.load(str(root / "onnx-fp16" / "target.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    kept = [n for n in model.graph.node if n.op_type in ("Softmax", "LogSoftmax", "TopK", "Cos", "Sqrt")]
    assert kept and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in kept)
    # what stayed FP32: attention softmax, norm statistics, rotary angles, the draft's tanh gates, head
    assert {"Softmax", "norm statistics", "rotary", "LogSoftmax", "TopK"} <= set(summary["target"])
    assert summary["draft"]["tanh gate"] == 2 and summary["vision"].get("norm statistics", 0) >= 1


def test_parity_fp32_and_fp16(fp16_bundle):
    root, _, _ = fp16_bundle
    report = check_bundle(root, variants=("fp32", "fp16"), seeds=(0,), log=lambda *_: None, samples=SAMPLES)
    assert report["ok"], report["failures"]
    assert not report["missing_variants"]
    for name in GRAPHS:
        for var in ("fp32", "fp16"):
            res = report["graphs"][name][var]
            assert res["ok"] and max(res["max_rel"].values()) <= TOLERANCE[var]
            assert {"random-seed0"} < set(res["cases"])  # plus the realistic cases
    assert set(report["graphs"]["target"]["fp32"]["cases"]) == {"random-seed0", "realistic-prefill",
                                                                "realistic-tree"}
    # FP32 agrees far inside its tolerance; FP16 is measurably different but within its own
    assert max(report["graphs"]["target"]["fp32"]["max_rel"].values()) < 1e-4
    assert max(report["graphs"]["target"]["fp16"]["max_rel"].values()) > 1e-5
    assert json.loads((root / "reports" / "parity.json").read_text())["ok"]


def test_parity_catches_a_corrupted_weight(fp16_bundle, tmp_path):
    root, _, _ = fp16_bundle
    shutil.copytree(root.parent, tmp_path / "pair")
    bad = tmp_path / "pair" / "bundle"
    model = onnx.load(str(bad / "onnx" / "target.onnx"))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims]
    victim = next((t for t in floats if "layernorm" in t.name), floats[0])
    w = numpy_helper.to_array(victim)
    victim.CopyFrom(numpy_helper.from_array((w * -2.0 + 0.5).astype(np.float32), victim.name))
    onnx.save(model, str(bad / "onnx" / "target.onnx"))
    report = check_bundle(bad, variants=("fp32",), seeds=(0,), log=lambda *_: None, samples=SAMPLES)
    assert not report["ok"]
    assert report["graphs"]["vision"]["fp32"]["ok"] and report["graphs"]["draft"]["fp32"]["ok"]
    assert report["failures"] and all(f.startswith("target/fp32/") for f in report["failures"])
    assert any("'hidden'" in f for f in report["failures"])


def test_parity_without_samples_checks_random_feeds_and_says_so(fp16_bundle):
    root, _, _ = fp16_bundle
    report = check_bundle(root, variants=("fp32",), seeds=(0,), log=lambda *_: None)
    assert report["ok"], report["failures"]
    assert "realistic" in report["not_checked"] and report["greedy"] == {}
    assert set(report["graphs"]["target"]["fp32"]["cases"]) == {"random-seed0"}
