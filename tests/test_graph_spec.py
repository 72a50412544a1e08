"""The exported graphs follow their specs: names, symbolic axes and bindings all come from one declaration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dream_export.core.graph_spec import SPECS, SYMBOLS, input_shapes, role_tensors


def _manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_exported_io_is_the_spec(demo_bundle):
    m = _manifest(demo_bundle)
    assert set(m["graphs"]) == set(SPECS)  # the demo draft is DREAM: it has the chain graph
    for name, entry in m["graphs"].items():
        spec = SPECS[name]
        for kind in ("inputs", "outputs"):
            for io in entry[kind]:
                axes = {i: d for i, d in enumerate(io["shape"]) if isinstance(d, str)}
                want = dict(spec.tensor(io["name"]).axes)
                assert set(want.values()) <= set(SYMBOLS)
                if kind == "inputs":  # what a caller sets: exactly the spec's symbols
                    assert axes == want, (name, io["name"])
                else:  # the exporter may name further output dims it infers (batch 1 of `hidden`)
                    assert {i: axes.get(i) for i in want} == want, (name, io["name"])
        names = [io["name"] for io in entry["inputs"] + entry["outputs"]]
        assert entry["bindings"] == {n: n for n in names}
        # the only input ONNX may drop is one the spec marks optional (a DREAM draft ignores prev_feat)
        missing = set(spec.input_names()) - {io["name"] for io in entry["inputs"]}
        assert all(spec.tensor(n).optional for n in missing)


def test_roles_select_caches_and_streams(demo_bundle):
    m = _manifest(demo_bundle)
    assert role_tensors(m["graphs"]["target"], "target", "cache") == {"past_key", "past_value"}
    assert role_tensors(m["graphs"]["draft"], "draft", "embeds", "pixels") == {"embeds"}
    assert role_tensors(m["graphs"]["vision"], "vision", "embeds", "pixels") == {"pixel_values"}


def test_input_shapes_run_the_graph(demo_bundle):
    """Shapes from `input_shapes` are ones ONNX Runtime accepts for the target graph."""
    import onnxruntime as ort

    m = _manifest(demo_bundle)
    entry, d, cap = m["graphs"]["target"], m["dims"], m["kv_capacity"]
    shapes = input_shapes(entry, {"tokens": 3, "slots": 5 + 3, "rows": 2})
    assert shapes["inputs_embeds"] == (1, 3, d["hidden"])
    assert shapes["past_key"] == (d["layers"], 1, d["kv_heads"], cap, d["head_dim"])
    assert shapes["attention_mask"] == (1, 3, 8)
    dtypes = {io["name"]: io["dtype"] for io in entry["inputs"]}
    feeds = {n: np.zeros(s, dtypes[n]) for n, s in shapes.items()}
    feeds["attention_mask"][..., 5:] = np.tril(np.ones((3, 3), bool))
    sess = ort.InferenceSession(str(demo_bundle / entry["file"]), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    assert out["topk_ids"].shape[0] == 2


def test_input_shapes_names_a_missing_symbol(demo_bundle):
    with pytest.raises(KeyError, match="slots"):
        input_shapes(_manifest(demo_bundle)["graphs"]["target"], {"tokens": 1, "rows": 1})
