"""Export memory: weights load in the checkpoint's dtype (`--dtype` overrides), the exported graphs stay fp32
and equal what a plain full-fp32 export traces. Peak RSS itself is measured by tools/export_memory.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dream_export.cli import cli
from tests.conftest import DEMO

KV, TREE = 32, 8


def _export(target: Path, draft: Path, out: Path, *extra: str) -> Path:
    res = CliRunner().invoke(cli, ["export", str(target), "--draft", str(draft), "-o", str(out), "--kv-capacity",
                                   str(KV), "--max-tree", str(TREE), "--skip-check", *extra])
    assert res.exit_code == 0, res.output
    return out


def _plain_target_graph(target_dir: Path, m: dict, out: Path) -> Path:
    """The target graph traced from the whole model loaded in fp32, Q/K/V joined by the exporter's constant
    folding: how exports traced it before they kept one copy of the weights."""
    import torch

    from dream_export.core.graph_spec import SPECS
    from dream_export.draft.target import load_target
    from dream_export.export.bundle import _export as export_graph
    from dream_export.export.graphs import TargetGraph

    target = load_target(target_dir, taps=tuple(m["taps"]), dtype="float32")
    dec, d, t = target.side.decoder, m["dims"], 4
    tg = TargetGraph(dec, target.model.lm_head, m["topk"], target.vlm.facts.final_logit_softcapping,
                     importance=True, tap_norm=bool(m.get("taps_norm"))).eval()
    past = torch.zeros(d["layers"], 1, d["kv_heads"], m["kv_capacity"], d["head_dim"])
    args = (torch.zeros(1, t, d["hidden"]), torch.arange(t)[None], torch.ones(1, t, m["kv_capacity"] + t, dtype=torch.bool),
            past, past.clone(), torch.tensor([t - 1]))
    names = SPECS["target"].output_names(present=["attn_importance", "attn_importance_max"]
                                         + (["taps"] if m["taps"] else []))
    export_graph(tg, args, out, SPECS["target"], names)
    return out


def _initializers(path: Path) -> list[tuple]:
    """(dtype, dims, sha256 of the bytes) of every initializer, sorted: the graph's weights, names aside
    (the exporter numbers folded ones by trace order)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    return sorted((t.data_type, tuple(t.dims), hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest())
                  for t in g.initializer)


def test_export_equals_a_plain_fp32_export_on_the_demo_pair(tmp_path):
    """The demo's fp16 checkpoint loads as fp16, converts once and joins Q/K/V up front: the target graph
    has the same nodes and byte-identical weights as one traced from a plain fp32 load, and runs to
    identical outputs."""
    from dream_export.export.feeds import ort_session
    from dream_export.export.parity import _random_feeds

    assert json.loads((DEMO / "vlm" / "config.json").read_text())["dtype"] == "float16"
    bundle = _export(DEMO / "vlm", DEMO / "draft", tmp_path / "bundle")
    m = json.loads((bundle / "manifest.json").read_text())
    new = bundle / m["graphs"]["target"]["file"]
    old = _plain_target_graph(DEMO / "vlm", m, tmp_path / "plain" / "target.onnx")

    import onnx

    assert [n.op_type for n in onnx.load(str(new)).graph.node] == [n.op_type for n in onnx.load(str(old)).graph.node]
    assert _initializers(new) == _initializers(old)
    a, b = ort_session(new, 1), ort_session(old, 1)
    for seed in (0, 1):
        feeds = _random_feeds("target", m, np.random.default_rng(seed), 0.02)
        names = [o.name for o in a.get_outputs()]
        for name, x, y in zip(names, a.run(names, feeds), b.run(names, feeds), strict=True):
            assert np.array_equal(x, y), f"{name} differs"


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """A tiny LLaVA saved in bf16 (as Hub checkpoints are) and a random DREAM draft for it."""
    import torch
    from transformers import AutoConfig

    from dream_export.draft.config import DraftConfig
    from dream_export.draft.model import Draft, init_weights
    from dream_export.draft.train import save_draft
    from tests.tiny_vlms import build_tiny_vlm

    root = tmp_path_factory.mktemp("bf16")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        target = build_tiny_vlm("llava", root / "target")
    finally:
        torch.set_default_dtype(default)
    torch.manual_seed(0)
    draft = Draft(DraftConfig.from_target(AutoConfig.from_pretrained(target).get_text_config()))
    init_weights(draft)
    save_draft(draft.eval(), root / "draft", record={})
    return target, root / "draft"


def test_dtype_auto_keeps_the_checkpoints_and_dtype_overrides_it(bf16_pair):
    import torch

    from dream_export.draft.target import load_target

    target, _ = bf16_pair
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_target(target).model.dtype == torch.float32  # drafting's default: fp32
    assert load_target(target, dtype="auto").model.dtype == torch.bfloat16
    assert load_target(target, dtype="float16").model.dtype == torch.float16


def test_bf16_checkpoint_exports_fp32_graphs_matching_the_fp32_reference(bf16_pair, tmp_path):
    """`--dtype auto` loads the bf16 weights as they are; the graphs are fp32 and pass parity against the fp32
    torch modules and the HF forward (every bf16 weight is exact in fp32)."""
    import onnx

    from dream_export.export.parity import check_bundle

    target, draft = bf16_pair
    bundle = _export(target, draft, tmp_path / "bundle", "--dtype", "auto")
    m = json.loads((bundle / "manifest.json").read_text())
    for name, g in m["graphs"].items():
        weights = onnx.load(str(bundle / g["file"])).graph.initializer
        assert {t.data_type for t in weights if len(t.dims) == 2} == {onnx.TensorProto.FLOAT}, name
    report = check_bundle(bundle, target, draft, variants=("fp32",), seeds=(0,), log=lambda *_: None)
    assert report["ok"], report["failures"]


def test_bad_dtype_is_refused_clearly(bf16_pair, tmp_path):
    from dream_export.draft.target import load_target
    from dream_export.errors import UsageError

    target, draft = bf16_pair
    with pytest.raises(UsageError, match="float8.*auto, float32, float16, bfloat16"):
        load_target(target, dtype="float8")
    res = CliRunner().invoke(cli, ["export", str(target), "--draft", str(draft), "-o", str(tmp_path / "b"),
                                   "--dtype", "float8"])
    assert res.exit_code == 2
    assert "float8" in res.output and "bfloat16" in res.output
    assert not (tmp_path / "b").exists()
