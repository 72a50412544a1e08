"""TensorRT-readiness lint: the tiny bundle's graphs, and graphs built to break each rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from dream_export.errors import UsageError
from dream_export.export.trt_lint import SOURCE, lint_bundle, lint_graph, resolve_version

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from bundle_fixture import cached_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.mark.parametrize("min_trt", ["8.6", "10"])
def test_tiny_bundle_graphs_pass(bundle, min_trt):
    report = lint_bundle(bundle, min_trt)
    assert report["ok"], {g: r["errors"] for g, r in report["graphs"].items()}
    assert {"vision", "target", "draft"} <= set(report["graphs"])
    on_disk = json.loads((bundle / "reports" / "trt_lint.json").read_text())
    assert on_disk["ok"] and on_disk["min_trt"] == min_trt
    target = report["graphs"]["target"]
    assert target["ops"]["TopK"] == 1 and target["opset"] == 16
    assert target["source"]["repo"] == "onnx/onnx-tensorrt" and target["source"]["commit"]


def test_tiny_bundle_target_and_draft_pass_trt_8_5(bundle):
    for name in ("target", "draft"):
        rep = lint_graph(bundle / "onnx" / f"{name}.onnx", "8.5")
        assert rep.ok, rep.errors
        # TensorRT 8.x has no INT64: the int64 I/O (positions, ids) is pointed out
        assert any("INT32" in w["message"] for w in rep.warnings)


def test_tiny_bundle_vision_passes_trt_8_5(bundle):
    assert lint_graph(bundle / "onnx" / "vision.onnx", "8.5").ok


def test_unsupported_standard_and_custom_domain_ops_fail():
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="uniq"),
             helper.make_node("FancyAttention", ["u"], ["y"], name="fancy", domain="com.example")]
    model = _model(nodes, [_vi("x", ["n"])], [_vi("y", ["m"])],
                   extra_opsets=[helper.make_opsetid("com.example", 1)])
    rep = lint_graph(model, "10")
    assert not rep.ok
    msgs = {e["op"]: e["message"] for e in rep.errors}
    assert "Unique" in msgs["Unique"] and "not supported" in msgs["Unique"]
    assert "FancyAttention" in msgs["FancyAttention"] and "com.example" in msgs["FancyAttention"]
    assert any("custom opset domain" in e["message"] for e in rep.errors)
    assert rep.ops == {"Unique": 1, "com.example::FancyAttention": 1}


def test_op_added_later_fails_only_for_older_versions():
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    model = _model([helper.make_node("LayerNormalization", ["x", "scale"], ["y"], name="ln")],
                   [_vi("x", [1, "t", 4])], [_vi("y", [1, "t", 4])], [scale])
    old, new = lint_graph(model, "8.5"), lint_graph(model, "8.6")
    assert not old.ok and "first supported in 8.6" in old.errors[0]["message"]
    assert new.ok, new.errors


def test_unnamed_dynamic_input_dim_fails_clearly():
    x = _vi("x", [1, None, 4])  # None -> a dim with neither value nor name ('?')
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [_vi("y", [1, None, 4])])
    rep = lint_graph(model, "8.5")
    assert not rep.ok
    (err,) = rep.errors
    assert "'x'" in err["message"] and "dim 1" in err["message"] and "unnamed" in err["message"]


def test_topk_restrictions():
    x = _vi("x", [1, "v"])
    outs = [_vi("v", [1, "k"]), _vi("i", [1, "k"], TensorProto.INT64)]
    dyn_k = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
                   [x, _vi("k", [1], TensorProto.INT64)], outs)
    assert any("constant" in e["message"] for e in lint_graph(dyn_k, "8.5").errors)
    assert lint_graph(dyn_k, "8.6").ok and lint_graph(dyn_k, "10").ok  # 8.6+ take a dynamic K
    big_k = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")], [x], outs,
                   [numpy_helper.from_array(np.array([5000], np.int64), "k")])
    assert any("3840" in e["message"] for e in lint_graph(big_k, "10").errors)


def test_integer_matmul_and_opset_range():
    a, b = _vi("a", [2, 2], TensorProto.INT64), _vi("b", [2, 2], TensorProto.INT64)
    model = _model([helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")], [a, b],
                   [_vi("c", [2, 2], TensorProto.INT64)])
    assert any("integer MatMul" in e["message"] for e in lint_graph(model, "10").errors)
    relu = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", [2])], [_vi("y", [2])], opset=19)
    assert any("opset 19" in e["message"] for e in lint_graph(relu, "8.6").errors)
    assert lint_graph(relu, "10.0").ok


def test_versions():
    assert resolve_version("10.x") == ("10.0", ["10.0", "10.1"])
    assert resolve_version("8.5")[1] == list(SOURCE["branches"])
    assert resolve_version("11")[0] == "10.1"
    relu = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", [2])], [_vi("y", [2])])
    assert any("10.1" in w["message"] for w in lint_graph(relu, "11").warnings)
    with pytest.raises(UsageError):
        resolve_version("7.1")
    with pytest.raises(UsageError):
        resolve_version("latest")
