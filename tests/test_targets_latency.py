"""Latency model: behaviour of the roofline predictions across capacities, targets and precisions; the
speculative-rate formula; `plan` and `profile` print predicted tokens/s and predicted vs measured."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dream_export.errors import UsageError
from dream_export.runtime.tree import TreeSpec
from dream_export.targets.latency import (
    Call,
    Capacities,
    LatencyModel,
    decode_calls,
    predict_target,
    speculative_rate,
    target_peaks,
)
from dream_export.targets.memory import DraftDesc, describe_model
from dream_export.targets.registry import get_target

LLAVA_7B = {"model_type": "llava",
            "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
                              "intermediate_size": 4096, "patch_size": 14, "image_size": 336}}
MODEL = describe_model(LLAVA_7B, name="llava-7b")
DECODE = Call("decode", "target", 1, 1)


def _demo():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "dream_export" / "assets" / "demo"
    cfg = json.loads((root / "vlm" / "config.json").read_text())
    return describe_model(cfg, "demo"), DraftDesc.from_config(json.loads((root / "draft" / "draft_config.json").read_text()))


def test_verify_latency_follows_the_used_slots_not_the_capacity():
    """The graphs read only the cache slots in use: the capacity costs nothing, the context does."""
    agx = get_target("jetson-agx-orin-64gb")
    at = lambda ctx: Call("verify", "target", 32, 32, context=ctx)  # noqa: E731
    by_cap = [LatencyModel(MODEL, Capacities.from_plan(cap, 32), "fp16").predict(at(512), agx)
              for cap in (512, 2048, 4096)]
    assert by_cap[0].bytes == by_cap[1].bytes == by_cap[2].bytes and by_cap[0].seconds == by_cap[2].seconds
    lm = LatencyModel(MODEL, Capacities.from_plan(4096, 32), "fp16")
    preds = [lm.predict(at(ctx), agx) for ctx in (128, 1024, 4096)]
    assert preds[0].bytes < preds[1].bytes < preds[2].bytes
    assert preds[0].seconds < preds[1].seconds < preds[2].seconds
    assert preds[0].attn_flops < preds[1].attn_flops < preds[2].attn_flops
    assert preds[0].gemm_flops == preds[2].gemm_flops  # weights do not depend on the cache
    assert lm.predict(at(10**6), agx).bytes == preds[2].bytes  # never more than the capacity holds


def test_bandwidth_bound_decode_scales_with_the_bandwidth_ratio():
    nano, agx = get_target("jetson-orin-nano-8gb"), get_target("jetson-agx-orin-64gb")
    lm = LatencyModel(MODEL, Capacities.from_plan(1024, 32), "int8")
    p_nano, p_agx = lm.predict(DECODE, nano), lm.predict(DECODE, agx)
    assert p_nano.bound == p_agx.bound == "memory"
    assert p_nano.overhead_s == p_agx.overhead_s  # same Jetson launch costs
    roofline = (p_nano.seconds - p_nano.overhead_s) / (p_agx.seconds - p_agx.overhead_s)
    assert roofline == pytest.approx(agx.bandwidth_gbs / nano.bandwidth_gbs)


def test_int8_halves_the_decoder_weight_bytes_but_not_the_head_or_cache():
    h100 = get_target("h100")
    caps = Capacities.from_plan(2048, 32)
    fp16 = LatencyModel(MODEL, caps, "fp16").predict(DECODE, h100)
    int8 = LatencyModel(MODEL, caps, "int8").predict(DECODE, h100)
    t = MODEL.text
    decoder_fp16 = 2 * t.num_layers * t.layer_params()
    assert fp16.bytes - int8.bytes == decoder_fp16 // 2
    assert int8.seconds < fp16.seconds


def test_compute_bound_prefill_uses_the_precisions_peak():
    h100 = get_target("h100")
    prefill = Call("prefill", "target", 2048, 1)
    p = LatencyModel(MODEL, Capacities.from_plan(4096, 32), "fp16").predict(prefill, h100)
    assert p.bound == "compute"
    assert p.compute_s == pytest.approx(p.gemm_flops / 989.4e12 + p.attn_flops / 989.4e12)
    assert target_peaks(h100, "int8").gemm_tflops == h100.int8_tops  # integer GEMMs, fp16 attention
    assert target_peaks(h100, "int8").attn_tflops == h100.fp16_tflops
    assert target_peaks(get_target("jetson-agx-xavier"), "fp32").gemm_tflops == pytest.approx(11.3 / 8)


def test_speculative_rate_is_tau_over_one_round():
    tree = TreeSpec(4, 6, 32)
    lm = LatencyModel(MODEL, Capacities.from_plan(2048, 32), "fp16")
    preds = {c.label: lm.predict(c, get_target("a100")) for c in decode_calls(tree, 5.0)}
    rate = speculative_rate(preds, tree, 5.0)
    s = {k.split(" (")[0]: p.seconds for k, p in preds.items()}
    assert rate["spec_tokens_per_s"] == pytest.approx(5.0 / (s["target verify"] + 5 * s["draft tree step"]
                                                             + s["draft context"]))
    assert rate["ar_tokens_per_s"] == pytest.approx(1 / s["target decode"])
    assert 1.0 < rate["speedup"] < 5.0


def test_predicted_numbers_are_in_sane_ranges():
    demo, demo_draft = _demo()
    tree = TreeSpec(4, 6, 32)
    h100 = predict_target(MODEL, Capacities.from_plan(4096, 32), get_target("h100"), "fp16", tree, 5.51)
    # 13.5 GB of fp16 weights at 3.35 TB/s: ~4 ms per decode step, ~190 tok/s at best
    assert 3e-3 < h100["calls"]["target decode (1 tok)"]["seconds"] < 10e-3
    assert 100 < h100["ar_tokens_per_s"] < 250 and h100["spec_tokens_per_s"] > h100["ar_tokens_per_s"]
    small = predict_target(demo, Capacities(256, 320, 320, 64), get_target("jetson-orin-nano-8gb"), "fp16", tree,
                           6.5, demo_draft)
    assert all(c["bound"] == "overhead" for c in small["calls"].values())  # a 6M-parameter model
    assert 0.05e-3 < small["calls"]["target decode (1 tok)"]["seconds"] < 5e-3
    with pytest.raises(UsageError, match="tau"):
        predict_target(MODEL, Capacities.from_plan(1024, 32), get_target("h100"), "fp16", tree, 9.0)
    with pytest.raises(UsageError, match="max_tree"):
        predict_target(MODEL, Capacities.from_plan(1024, 16), get_target("h100"), "fp16", tree, 5.0)


def run(*args):
    return subprocess.run([sys.executable, "-m", "dream_export.cli", *args], capture_output=True, text=True)


def test_plan_prints_predicted_tokens_per_second(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAVA_7B))
    one = run("plan", str(cfg), "--target", "jetson-agx-orin-64gb", "--json")
    assert one.returncode == 0, one.stderr
    lat = json.loads(one.stdout.strip().splitlines()[-1])["latency"]
    assert lat["spec_tokens_per_s"] > lat["ar_tokens_per_s"] > 0 and lat["tau"] == 5.51
    every = run("plan", str(cfg), "--target", "all", "--json", "--tau", "4")
    assert every.returncode == 0, every.stderr
    rows = {r["target"]: r for r in json.loads(every.stdout.strip().splitlines()[-1])["targets"]}
    assert rows["h100"]["fits"] and not rows["jetson-orin-nano-8gb"]["fits"]
    assert rows["h100"]["spec_tokens_per_s"] > rows["jetson-agx-orin-64gb"]["spec_tokens_per_s"]
    text = run("plan", str(cfg), "--target", "all", "--precision", "fp8")
    assert "spec tok/s" in text.stdout and "no fp8 on jetson-agx-orin-64gb" in text.stdout
    assert run("plan", str(cfg), "--target", "h100", "--draft-tree", "4,6").returncode == 2


def test_profile_prints_predicted_vs_measured_for_the_demo_bundle(tmp_path, demo_bundle):
    import shutil

    from PIL import Image

    b = tmp_path / "bundle"
    shutil.copytree(demo_bundle, b)
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(img)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": str(img), "prompt": "Describe everything in the image."}) + "\n")
    r = run("profile", str(b), "--data", str(data), "--limit", "1", "--reps", "2", "--top", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert "latency model vs measured on cpu" in r.stdout and "meas/pred" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    rows = summary["latency"]["rows"]
    assert [row["call"].split(" (")[0] for row in rows] == ["vision", "target prefill", "target decode",
                                                           "target verify", "draft context", "draft tree step"]
    assert all(row["measured_s"] > 0 and row["predicted_s"] > 0 for row in rows)
    assert summary["latency"]["measured_rate"]["spec_tokens_per_s"] > 0
    report = json.loads((b / "reports" / "profile.json").read_text())
    assert report["latency"]["rows"] == rows
    assert (b / "reports" / "profile.png").stat().st_size > 0
