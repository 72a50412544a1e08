"""Profiles: trtexec's exported per-layer JSON and ONNX Runtime's profiler JSON read into one table."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dream_export.errors import UsageError
from dream_export.targets import (
    format_table,
    load_profile,
    parse_ort_profile,
    parse_trtexec_layer_info,
    parse_trtexec_profile,
)
from dream_export.targets.profiles import ROW_KEYS

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TRT_PROFILE = os.path.join(FIXTURES, "targets_trtexec_profile.json")
TRT_LAYERS = os.path.join(FIXTURES, "targets_trtexec_layers.json")


def test_trtexec_profile_rows_are_mean_times_sorted_with_shares():
    rows = parse_trtexec_profile(TRT_PROFILE)
    assert [r["name"] for r in rows][:2] == ["lm_head/MatMul", "/model/layers.0/mlp/down_proj/MatMul"]
    assert rows[0]["time_ms"] == pytest.approx(0.52)  # averageMs, per run (timeMs 52 over 100 runs)
    assert [r["share"] for r in rows] == pytest.approx([0.52, 0.31, 0.09, 0.05, 0.03])
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert all(r["op_type"] is None and r["precision"] is None for r in rows)  # no layer info given
    assert all(tuple(r) == ROW_KEYS for r in rows)


def test_layer_info_adds_types_and_precisions():
    rows = {r["name"]: r for r in parse_trtexec_profile(TRT_PROFILE, layer_info=TRT_LAYERS)}
    assert (rows["lm_head/MatMul"]["op_type"], rows["lm_head/MatMul"]["precision"]) == ("MatrixMultiply", "fp16")
    assert rows["/model/layers.0/mlp/down_proj/MatMul"]["precision"] == "int8"  # Q/DQ GEMM reads int8
    myelin = next(r for n, r in rows.items() if n.startswith("{ForeignNode"))
    assert (myelin["op_type"], myelin["precision"]) == ("Myelin", "fp16")  # kgen-style "Half"
    reformat = rows["Reformatting CopyNode for Input Tensor 0 to lm_head/MatMul"]
    assert (reformat["op_type"], reformat["precision"]) == ("Reformat", "fp32")


def test_layer_info_without_detailed_verbosity_says_what_to_do():
    with pytest.raises(UsageError, match="profilingVerbosity=detailed"):
        parse_trtexec_layer_info({"Layers": ["lm_head/MatMul"], "Bindings": []})


def test_trtexec_layer_names_trtexec_did_not_escape_still_parse():
    # trtexec writes names verbatim; a quote in a name makes the file invalid JSON
    text = ('[\n  { "count" : 10 }\n'
            ', { "name" : "Cast "x" to fp16", "timeMs" : 3, "averageMs" : 0.3, "medianMs" : 0.3, "percentage" : 75 }\n'
            ', { "name" : "Add", "timeMs" : 1, "averageMs" : 0.1, "medianMs" : 0.1, "percentage" : 25 }\n]\n')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    rows = parse_trtexec_profile(text)
    assert [(r["name"], r["time_ms"]) for r in rows] == [('Cast "x" to fp16', 0.3), ("Add", 0.1)]


def test_not_a_profile_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        parse_trtexec_profile({"Layers": []})
    with pytest.raises(UsageError, match="no node events"):
        parse_ort_profile([{"cat": "Session", "name": "model_run", "dur": 5}])
    with pytest.raises(UsageError, match="cannot read"):
        load_profile(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def ort_profile(tmp_path_factory):
    """A real ONNX Runtime profile of a tiny MatMul -> Add -> Relu graph, 4 runs on CPU."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
         helper.make_node("Relu", ["hb"], ["y"], name="act")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path_factory.mktemp("ort") / "tiny")
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the three nodes
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((8, 64)).astype(np.float32)
    for _ in range(4):
        sess.run(None, {"x": x})
    return sess.end_profiling()


def test_ort_profile_rows_have_the_trtexec_row_shape(ort_profile):
    rows = parse_ort_profile(ort_profile)
    trt_rows = parse_trtexec_profile(TRT_PROFILE, layer_info=TRT_LAYERS)
    assert all(tuple(r) == ROW_KEYS for r in rows + trt_rows)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"proj", "bias", "act"}
    assert (by_name["proj"]["op_type"], by_name["proj"]["precision"]) == ("MatMul", "fp32")
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["time_ms"] for r in rows] == sorted((r["time_ms"] for r in rows), reverse=True)


def test_ort_time_is_the_mean_per_run(ort_profile):
    events = json.loads(open(ort_profile).read())
    runs = sum(1 for e in events if e.get("name") == "model_run")
    assert runs == 4
    proj_us = sum(e["dur"] for e in events if e.get("cat") == "Node" and e["name"] == "proj_kernel_time")
    row = next(r for r in parse_ort_profile(ort_profile) if r["name"] == "proj")
    assert row["time_ms"] == pytest.approx(proj_us / 1000 / 4)
    # load_profile tells the two formats apart
    assert load_profile(ort_profile) == parse_ort_profile(ort_profile)
    assert load_profile(TRT_PROFILE, layer_info=TRT_LAYERS)[0]["precision"] == "fp16"


def test_format_table_shows_the_top_rows_and_what_was_left_out():
    rows = parse_trtexec_profile(TRT_PROFILE, layer_info=TRT_LAYERS)
    text = format_table(rows, top=2)
    lines = text.splitlines()
    assert "time ms" in lines[0] and "share" in lines[0]
    assert "lm_head/MatMul" in lines[1] and "52.0%" in lines[1] and "fp16" in lines[1]
    assert "down_proj" in lines[2] and "83.0%" in lines[2]  # cumulative share
    assert "3 more layers" in text and "total 1.0000 ms per run over 5 layers" in text
    assert "more layers" not in format_table(rows)  # top=15 shows all five
    assert format_table([]) == "(empty profile)"
