"""The accuracy report: τ, greedy agreement with fp32, demo accuracy and size per precision."""

from __future__ import annotations

import json

try:
    from tests.calib_fixture import calibrated, prompt_files
except ImportError:  # tests/ itself on sys.path
    from calib_fixture import calibrated, prompt_files


def test_precision_names():
    from dream_export.calib.report import precision_name

    p = lambda **kw: {"precision": {"vision": "fp32", "target": "fp32", "draft": "fp32", **kw}}  # noqa: E731
    assert precision_name(p()) == "fp32"
    assert precision_name(p(vision="fp16", target="fp16", draft="fp16")) == "fp16"
    assert precision_name(p(vision="int8", target="int8", draft="int8")) == "int8-all"
    assert precision_name(p(target="int8")) == "int8-target"
    assert precision_name(p(target="int8", draft="int8")) == "int8-target+draft"


def test_report_against_fp32(demo_bundle, tmp_path_factory):
    from dream_export.calib.report import calib_report
    from dream_export.demo.scenes import answer_key

    work = tmp_path_factory.mktemp("calib")
    int8 = calibrated(demo_bundle, work)
    _, heldout = prompt_files(work / "prompts")
    out = work / "calib.json"
    lines = []
    rep = calib_report([(None, demo_bundle), (None, int8)], heldout, out, max_new_tokens=32, log=lines.append,
                       progress=False, answer_key=answer_key)
    assert json.loads(out.read_text())["precisions"].keys() == {"fp32", "int8-target+draft"}
    ref, q = rep["precisions"]["fp32"], rep["precisions"]["int8-target+draft"]
    assert ref["match_rate"] == 1.0 and ref["first_divergence"] == [] and ref["tau_ratio"] == 1.0
    assert ref["accuracy_questions"] == 2 and 0.0 <= ref["accuracy"] <= 1.0
    assert q["tau"] > 1.0 and 0.0 <= q["match_rate"] <= 1.0
    assert len(q["first_divergence"]) == q["prompts"] - q["matches"]
    assert q["size_bytes"] < 0.6 * ref["size_bytes"]  # INT8 target + draft weights
    assert "int8-target+draft" in lines[0] and "tau" in lines[0]
