"""INT8 Q/DQ bundles from real calibration: they run, agree with fp32, keep sensitive ops float, lint clean."""

from __future__ import annotations

import json

import numpy as np
import pytest

try:
    from tests.calib_fixture import calibrated, prompt_files
except ImportError:  # tests/ itself on sys.path
    from calib_fixture import calibrated, prompt_files


@pytest.fixture(scope="module")
def int8(demo_bundle, tmp_path_factory):
    return calibrated(demo_bundle, tmp_path_factory.mktemp("calib"))


def _feeds(bundle, n=6):
    from dream_export.calib.capture import capture_feeds
    from dream_export.core.prompts import read_prompts

    calib, _ = prompt_files(bundle.parent / "prompts-q")
    return capture_feeds(bundle, read_prompts(calib)[:2], samples=n, max_new_tokens=16, progress=False)


def test_int8_bundle_loads_in_the_runtime_and_answers_like_fp32(demo_bundle, int8):
    from PIL import Image

    from dream_export.core.prompts import read_prompts
    from dream_export.runtime.pipeline import Pipeline

    m = json.loads((int8 / "manifest.json").read_text())
    assert m["precision"] == {"vision": "fp32", "target": "int8", "draft": "int8"}
    assert m["graphs"]["target"]["file"] == "onnx-int8/target.onnx" and m["calibration"]["method"] == "minmax"
    _, heldout = prompt_files(int8.parent / "prompts")
    row = read_prompts(heldout)[1]  # a counting question
    image = Image.open(row["image"]).convert("RGB")
    ref = Pipeline.load(demo_bundle, threads=1).generate(image, row["prompt"], max_new_tokens=40)
    got = Pipeline.load(int8, threads=1).generate(image, row["prompt"], max_new_tokens=40)
    assert got.tokens == ref.tokens
    assert got.stats["tau"] > 0.8 * ref.stats["tau"]


def test_qdq_target_logits_agree_with_fp32_on_recorded_feeds(demo_bundle, int8):
    from dream_export.export.parity import compare_graphs

    cap = _feeds(demo_bundle)
    res = compare_graphs(demo_bundle / "onnx" / "target.onnx", int8 / "onnx-int8" / "target.onnx",
                         cap.feeds["target"], "fp16")
    # 8 calibration feeds only (the demo measurement uses 64): still well inside the logit scale
    assert res["max_rel"]["row_logits"] < 0.2 and res["max_rel"]["hidden"] < 0.3
    assert res["id_agreement"]["topk_ids"] > 0.6
    # agreement is not trivial: the graph really is quantized
    assert res["max_rel"]["row_logits"] > 1e-4


def test_sensitive_ops_and_kv_cache_stay_float(int8):
    import onnx

    m = json.loads((int8 / "manifest.json").read_text())
    info = m["calibration"]["components"]["target"]
    assert info["kept"]["LM head"] == 1 and info["kept"]["Softmax"] >= 1 and info["quantized"] > 100
    assert m["calibration"]["components"]["draft"]["kept"]["tanh gate"] == 2
    g = onnx.load(str(int8 / "onnx-int8" / "target.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    b = m["graphs"]["target"]["bindings"]
    for role in ("past_key", "past_value"):
        assert all(c.op_type != "QuantizeLinear" for c in consumers[b[role]])
    for role in ("new_key", "new_value", "row_logits", "topk_logprobs"):
        assert producer[b[role]].op_type not in ("DequantizeLinear", "QuantizeLinear")
    # every Q/DQ feeds a linear (input side only), and the LM head reads a float activation
    lm = next(n for n in g.node if n.op_type == "MatMul" and "lm_head" in n.name)
    assert producer[lm.input[0]].op_type != "DequantizeLinear"
    # graph I/O is unchanged: the runtime feeds the Q/DQ graph like the fp32 one
    assert [i.name for i in g.input] == [i["name"] for i in m["graphs"]["target"]["inputs"]]


def test_qdq_graphs_pass_the_tensorrt_lint(int8):
    import onnx
    from onnx import numpy_helper

    from dream_export.calib.qdq_lint import lint_qdq, qdq_errors

    for comp in ("target", "draft"):
        rep = lint_qdq(int8 / "onnx-int8" / f"{comp}.onnx")
        assert rep["ok"], rep["errors"][:3]
        assert rep["ops"]["QuantizeLinear"] > 5 and rep["ops"]["DequantizeLinear"] > 5
    assert json.loads((int8 / "reports" / "calib_lint.json").read_text())["target"]["ok"]
    # the Q/DQ rules are real checks: an asymmetric zero point is caught
    model = onnx.load(str(int8 / "onnx-int8" / "draft.onnx"))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zp = next(t for t in model.graph.initializer if t.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    assert any("zero point" in e for e in qdq_errors(model))


def test_selection_rules_and_excludes(demo_bundle):
    import onnx

    from dream_export.calib.select import parse_exclude, select_nodes
    from dream_export.errors import UsageError

    m = json.loads((demo_bundle / "manifest.json").read_text())
    draft = onnx.load(str(demo_bundle / "onnx" / "draft.onnx"))
    sel = select_nodes(draft, m["dims"]["vocab"], [], {m["graphs"]["draft"]["bindings"]["embeds"]})
    raw = [n for n, why in sel.kept.items() if why == "un-normalized input stream"]
    # the draft's block 0 has no input norm: its attention linears read the raw token stream
    assert raw and all("blocks.0/self_attn" in n for n in raw)
    target = onnx.load(str(demo_bundle / "onnx" / "target.onnx"))
    base = select_nodes(target, m["dims"]["vocab"], [])
    last = select_nodes(target, m["dims"]["vocab"], parse_exclude("layer:-1"))
    down = select_nodes(target, m["dims"]["vocab"], parse_exclude("layer:-1,*down_proj*"))
    per_layer = len(base.quantize) // m["dims"]["layers"]
    assert len(base.quantize) == per_layer * m["dims"]["layers"] and per_layer >= 4
    # layer:-1 keeps exactly the last decoder layer's linears; the glob adds every other down_proj
    assert len(set(base.quantize) - set(last.quantize)) == per_layer
    assert len(set(base.quantize) - set(down.quantize)) == per_layer + m["dims"]["layers"] - 1
    with pytest.raises(UsageError, match="layer:I"):
        parse_exclude("layer:last")


def test_fp16_bundle_with_parity_report(demo_bundle, tmp_path_factory):
    out = calibrated(demo_bundle, tmp_path_factory.mktemp("calib16"), "fp16", ("draft", "vision"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == {"vision": "fp16", "target": "fp32", "draft": "fp16"}
    rep = json.loads((out / "reports" / "fp16_parity.json").read_text())
    assert rep["draft"]["ok"] and rep["vision"]["ok"]
    assert 0 < max(rep["draft"]["max_rel"].values()) < 3e-2


@pytest.mark.slow
def test_smoothquant_int8_target_matches_fp32(demo_bundle, tmp_path_factory):
    out = calibrated(demo_bundle, tmp_path_factory.mktemp("calibsq"), "int8", ("target",), smooth_alpha=0.5,
                     method="percentile")
    info = json.loads((out / "manifest.json").read_text())["calibration"]["components"]["target"]
    assert info["smoothquant"]["groups"] > 50 and info["trt_lint_ok"]


@pytest.mark.slow
def test_check_on_a_calibrated_bundle(int8):
    from dream_export.demo.scenes import rendered_samples
    from dream_export.export.parity import GREEDY_PROMPTS, check_bundle

    rep = check_bundle(int8, seeds=(0,), log=lambda *_: None, samples=rendered_samples(GREEDY_PROMPTS))
    # the kept fp32 graphs are checked against torch; INT8 graphs are left to calib-report
    assert rep["ok"], rep["failures"]
    assert set(rep["not_checked"]) == {"target", "draft"} and "fp32" in rep["graphs"]["target"]
