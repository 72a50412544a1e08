"""`dream-export build` on a CPU host writes build plans whose trtexec lines match build.json exactly;
`dream-export plan` sizes models for targets and refuses with numbers."""

import json
import subprocess
import sys

import pytest

from dream_export.targets.trtexec import GraphBuild, parse_build_script

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # pragma: no cover
    from bundle_fixture import cached_tiny_bundle


def run(*args):
    return subprocess.run([sys.executable, "-m", "dream_export.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("target,jetpack", [("jetson-orin-nano-8gb", None), ("h100", None),
                                            ("jetson-orin-nano-8gb", "5.1")])
def test_build_script_parses_back_to_the_plan(bundle, target, jetpack):
    r = run("build", str(bundle), "--target", target, *(["--jetpack", jetpack] if jetpack else []))
    assert r.returncode == 0, r.stderr
    out = bundle / "engines" / target
    plan = json.loads((out / "build.json").read_text())
    assert plan["tensorrt_expected"] == {"5.1": "8.5", None: "10.3" if target != "h100" else "10.0"}[jetpack]
    check = json.loads((out / "plan_check.json").read_text())
    assert check["calls"] > 200 and (check["uncovered"], check["unknown_options"], check["missing_files"]) == (0, 0, 0)
    assert set(check["verified_components"]) == {"vision", "target", "draft"}
    parsed = parse_build_script((out / "build.sh").read_text())
    assert [b.component for b in parsed] == ["vision", "target", "draft"]
    for b, d in zip(parsed, plan["builds"], strict=True):
        assert b.static == d["static"] == (b.component == "vision")  # the vision graph is static
        # a static graph's command names no shapes (trtexec refuses them); the plan keeps its one shape
        assert b.to_dict()["profiles"] == ([] if b.static else d["profiles"])
        assert (b.fp16, b.int8, b.strongly_typed) == (d["fp16"], d["int8"], d["strongly_typed"])
        assert GraphBuild.from_dict({**d, "profiles": b.to_dict()["profiles"]}).to_dict() == b.to_dict()
    target_build = next(d for d in plan["builds"] if d["component"] == "target")
    if jetpack == "5.1":  # trtexec 8.5 builds one profile: prefill and verify merged
        assert len(target_build["profiles"]) == 1
        return
    assert len(target_build["profiles"]) == 2  # prefill and verify
    m = json.loads((bundle / "manifest.json").read_text())
    verify = target_build["profiles"][1]["inputs_embeds"]["max"]
    assert verify[1] == m["max_tree"]
    # the target reads only the used cache slots: a prefill's mask spans one 32-slot bucket of the empty
    # cache plus the prompt (at most kv_capacity - 1 tokens, one slot stays for the answer)
    mask = target_build["profiles"][0]["attention_mask"]
    bucket = min(32, m["kv_capacity"])
    assert mask["min"][2] == bucket + 1 and mask["max"][2] == bucket + m["kv_capacity"] - 1
    assert target_build["profiles"][1]["attention_mask"]["max"][2] == m["kv_capacity"] + m["max_tree"]


def test_replanning_replaces_the_plan_as_a_set_and_keeps_built_engines(bundle, tmp_path):
    """A plan (build.json, build.sh, plan_check.json) is written into a temporary sibling and swapped in whole;
    engines already built into engines/<target> (copied back from the device) stay."""
    import shutil
    import stat

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    out = b / "engines" / "h100"
    assert run("build", str(b), "--target", "h100", "--no-verify").returncode == 0
    (out / "target.engine").write_bytes(b"an engine built on the device")
    before = (out / "build.sh").read_text()
    r = run("build", str(b), "--target", "h100", "--no-verify", "--precision", "fp16", "--workspace", "1024")
    assert r.returncode == 0, r.stderr
    assert (out / "target.engine").read_bytes() == b"an engine built on the device"
    assert (out / "build.sh").read_text() != before and "1024" in (out / "build.sh").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary sibling left"
    assert stat.S_IMODE(out.stat().st_mode) & 0o055, "the plan directory is readable by others, like any other"


def test_build_refuses_impossible_requests_with_reason(bundle):
    r = run("build", str(bundle), "--target", "jetson-orin-nano-8gb", "--dla", "0")
    assert r.returncode == 2 and "DLA" in r.stderr and "Traceback" not in r.stderr
    r = run("build", str(bundle), "--target", "jetson-orin-nano-8gb", "--precision", "fp8")
    assert r.returncode == 2 and "fp8" in r.stderr
    r = run("build", str(bundle), "--target", "h100", "--precision", "fp8")
    assert r.returncode == 2 and "onnx-fp8" in r.stderr and "Traceback" not in r.stderr
    r = run("build", str(bundle), "--target", "jetson-orin-nano-8gb", "--precision", "int8", "--no-verify")
    assert r.returncode == 2 and "dream-export calibrate" in r.stderr and "--precision int8" in r.stderr
    r = run("build", str(bundle), "--target", "h100", "--jetpack", "6.0")
    assert r.returncode == 2 and "not a Jetson" in r.stderr
    r = run("build", str(bundle), "--target", "jetson-agx-xavier", "--jetpack", "6.2")
    assert r.returncode == 2 and "does not run JetPack 6.2" in r.stderr


LLAVA_7B = {"model_type": "llava",
            "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
                              "intermediate_size": 4096, "patch_size": 14, "image_size": 336}}


def test_plan_prints_numbers_and_refuses_too_small_targets(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAVA_7B))
    ok = run("plan", str(cfg), "--target", "jetson-agx-orin-64gb", "--json")
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout.strip().splitlines()[-1])
    assert plan["device_bytes"] <= plan["usable_bytes"] and plan["kv_capacity"] >= 1024
    weights = next(i for i in plan["items"] if i["name"] == "target_weights")
    assert 12.5e9 < weights["bytes"] < 14e9  # 6.7B parameters in fp16
    assert run("plan", "/dev/null", "--target", "h100").returncode == 2
    bad = run("plan", str(cfg), "--target", "jetson-orin-nano-4gb")
    assert bad.returncode == 2 and "GiB" in bad.stderr and "jetson-orin-nano-4gb" in bad.stderr


def test_plan_of_the_demo_bundle_fits_everywhere(bundle):
    r = run("plan", str(bundle), "--target", "jetson-orin-nano-4gb", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert plan["device_bytes"] <= plan["usable_bytes"]


def test_cpu_target_writes_optimized_graphs_the_runtime_loads(tmp_path, bundle):
    import shutil

    import numpy as np

    from dream_export.runtime.pipeline import Pipeline

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    r = run("build", str(b), "--target", "cpu")
    assert r.returncode == 0, r.stderr
    plan = json.loads((b / "engines" / "cpu" / "build.json").read_text())
    assert plan["session"]["intra_op_num_threads"] == 2 and set(plan["graphs"]) == {"vision", "target", "draft", "draft_chain"}
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    plain = Pipeline.load(b).generate(image, "hello", max_new_tokens=12, tree="2,4,8")
    opt = Pipeline.load(b, precision="cpu").generate(image, "hello", max_new_tokens=12, tree="2,4,8")
    assert opt.tokens == plain.tokens
