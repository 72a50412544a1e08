"""8-bit draft weights for CPUs: answers unchanged, acceptance kept, the graphs really quantized."""

import json
import shutil

import numpy as np
import onnx

from dream_export.demo import scenes
from dream_export.runtime.pipeline import Pipeline
from dream_export.runtime.tree import TreeSpec
from dream_export.targets.cpu_build import build_cpu


def test_int8_draft_keeps_answers_and_acceptance(demo_bundle, demo_pipeline, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(demo_bundle, b)
    plan = build_cpu(b, threads=1, log=lambda _m: None)
    assert plan["draft_weights"] == {"weights": "int8", "op": "MatMulNBits", "block_size": 32, "accuracy_level": 4}
    manifest = json.loads((b / "manifest.json").read_text())
    for name in ("draft", "draft_chain"):
        ops = [n.op_type for n in onnx.load(b / manifest["graphs"][name]["variants"]["cpu"]["file"]).graph.node]
        assert "MatMulNBits" in ops, name
    target_ops = [n.op_type for n in onnx.load(b / manifest["graphs"]["target"]["variants"]["cpu"]["file"]).graph.node]
    assert "MatMulNBits" not in target_ops  # the target's numerics stay as exported

    cpu = Pipeline.load(b, threads=1, precision="cpu")
    taus = {"fp32": [], "int8": []}
    data = scenes.heldout(1)
    for sc, s in data[:4]:
        img = scenes.render(sc)
        ar = demo_pipeline.generate(img, s.prompt, max_new_tokens=60, mode="ar")
        fp = demo_pipeline.generate(img, s.prompt, max_new_tokens=60, mode="chain", tree=TreeSpec.chain(6))
        q = cpu.generate(img, s.prompt, max_new_tokens=60, mode="chain", tree=TreeSpec.chain(6))
        assert q.tokens == ar.tokens == fp.tokens
        taus["fp32"] += fp.stats["rounds"]
        taus["int8"] += q.stats["rounds"]
    assert np.mean(taus["int8"]) >= 0.9 * np.mean(taus["fp32"]), taus
