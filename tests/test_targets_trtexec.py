"""Build plans: exact trtexec arguments per TensorRT dialect, lossless round trips, and build.sh behaviour.

TensorRT is not installed here. The build.sh tests put a small stand-in named `trtexec` on PATH that
only prints a version banner and writes placeholder bytes: they exercise the script's own checks
(version gate, metadata marker, restore on failure), never TensorRT itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from dream_export.errors import UsageError
from dream_export.targets import (
    GraphBuild,
    make_build,
    merge_profiles,
    parse_build_script,
    parse_trtexec_command,
    trtexec_command,
    trtexec_profile_command,
    write_build_bundle,
)

H = 4096
# prefill (1..4096 tokens) and verify (1..64 tree tokens) profiles of the target graph
TARGET_PROFILES = [
    {"inputs_embeds": ((1, 1, H), (1, 512, H), (1, 4096, H)), "position_ids": ((1, 1), (1, 512), (1, 4096))},
    {"inputs_embeds": ((1, 1, H), (1, 64, H), (1, 64, H)), "position_ids": ((1, 1), (1, 64), (1, 64))},
]
VISION_PROFILES = [{"pixel_values": ((1, 3, 336, 336), (1, 3, 336, 336), (5, 3, 336, 336))}]
DRAFT_PROFILES = [{"inputs_embeds": ((1, 1, H), (1, 16, H), (1, 64, H)),
                   "target_features": ((1, 0, H), (1, 16, H), (1, 4096, H))}]


def _plan(target="jetson-orin", precision="fp16", **kw):
    return [make_build("vision", precision, target, VISION_PROFILES, **kw),
            make_build("target", precision, target, TARGET_PROFILES, **kw),
            make_build("draft", precision, target, DRAFT_PROFILES, **kw)]


def test_fp16_two_profile_target_command_on_tensorrt_10():
    b = make_build("target", "fp16", "jetson-orin", TARGET_PROFILES, timing_cache="engines/timing.cache",
                   builder_optimization_level=4, layer_info=True)
    assert trtexec_command(b) == [
        "trtexec", "--onnx=onnx-fp16/target.onnx", "--saveEngine=engines/jetson-agx-orin-64gb/target.engine",
        "--profile=0",
        "--minShapes=inputs_embeds:1x1x4096,position_ids:1x1",
        "--optShapes=inputs_embeds:1x512x4096,position_ids:1x512",
        "--maxShapes=inputs_embeds:1x4096x4096,position_ids:1x4096",
        "--profile=1",
        "--minShapes=inputs_embeds:1x1x4096,position_ids:1x1",
        "--optShapes=inputs_embeds:1x64x4096,position_ids:1x64",
        "--maxShapes=inputs_embeds:1x64x4096,position_ids:1x64",
        "--fp16", "--memPoolSize=workspace:4096M", "--timingCacheFile=engines/timing.cache",
        "--builderOptimizationLevel=4", "--profilingVerbosity=detailed",
        "--exportLayerInfo=engines/jetson-agx-orin-64gb/target.layers.json", "--skipInference",
    ]


def test_int8_is_strongly_typed_qdq_on_tensorrt_10_and_calibrated_on_tensorrt_8():
    modern = make_build("vision", "int8", "jetson-agx-orin-64gb", VISION_PROFILES)
    argv = trtexec_command(modern)
    assert "--stronglyTyped" in argv and "--int8" not in argv and "--fp16" not in argv
    assert argv[1] == "--onnx=onnx-int8/vision.fp16.onnx" and modern.precision == "int8"

    legacy = make_build("vision", "int8", "jetson-agx-xavier", VISION_PROFILES)  # JetPack 5.1: TensorRT 8.5
    argv8 = trtexec_command(legacy)
    assert "--stronglyTyped" not in argv8
    assert {"--int8", "--fp16", "--calib=calib/vision.cache"} <= set(argv8)
    assert argv8[1] == "--onnx=onnx/vision.onnx"  # the fp32 graph: the cache holds its tensor names
    assert "--memPoolSize=workspace:2048" in argv8  # 8.x reads a bare number as MiB
    assert argv8[-1] == "--buildOnly" and "--profile=0" not in argv8  # a single profile needs no group


def test_tensorrt_8_builds_one_merged_profile():
    # trtexec 8.5/8.6 has no --profile: make_build merges, a hand-made multi-profile build is refused
    b = make_build("target", "fp16", "jetson-xavier-nx", TARGET_PROFILES)
    merged = merge_profiles(TARGET_PROFILES)
    assert b.profiles == [merged]
    assert merged["inputs_embeds"] == ((1, 1, H), (1, 512, H), (1, 4096, H))
    assert "--maxShapes=inputs_embeds:1x4096x4096,position_ids:1x4096" in trtexec_command(b)
    with pytest.raises(UsageError, match="merge"):
        trtexec_command(GraphBuild("target", "a.onnx", "a.engine", TARGET_PROFILES, fp16=True, tensorrt="8.6"))


def test_dla_flags_and_limits():
    b = make_build("vision", "fp16", "jetson-orin", VISION_PROFILES, dla_core=1)
    argv = trtexec_command(b)
    assert argv[argv.index("--useDLACore=1") + 1] == "--allowGPUFallback"
    with pytest.raises(UsageError, match="no DLA"):
        make_build("vision", "fp16", "jetson-orin-nano-8gb", VISION_PROFILES, dla_core=0)
    with pytest.raises(UsageError, match="DLA core 2"):
        make_build("vision", "fp16", "jetson-orin", VISION_PROFILES, dla_core=2)


def test_bad_plans_are_refused_with_reasons():
    with pytest.raises(UsageError, match="min <= opt <= max"):
        make_build("target", "fp16", "h100", [{"x": ((1, 8), (1, 4), (1, 16))}])
    with pytest.raises(UsageError, match="does not support fp8"):
        make_build("target", "fp8", "jetson-orin", TARGET_PROFILES)
    with pytest.raises(UsageError, match="nothing to build"):
        make_build("target", "fp16", "cpu", TARGET_PROFILES)
    with pytest.raises(UsageError, match="unknown component"):
        GraphBuild("decoder", "a.onnx", "a.engine", [])
    with pytest.raises(UsageError, match="no dream-export command writes"):  # nothing writes onnx-fp8/
        make_build("target", "fp8", "h100", TARGET_PROFILES)


@pytest.mark.parametrize("target,precision", [("jetson-orin", "fp16"), ("jetson-orin", "int8"),
                                              ("h100", "int8"), ("jetson-agx-xavier", "int8")])
def test_command_round_trips_to_the_same_build(target, precision):
    b = make_build("target", precision, target, TARGET_PROFILES, dla_core=None, layer_info=True)
    back = parse_trtexec_command(trtexec_command(b), tensorrt=b.tensorrt)
    assert back == b
    # and from a shell line, with the component taken from the ONNX file name
    assert parse_trtexec_command(" ".join(trtexec_command(b)), tensorrt=b.tensorrt) == b


def test_bundle_files_agree_with_each_other_and_with_the_plan(tmp_path):
    builds = _plan("jetson-orin", "int8") + [make_build("vision", "fp16", "jetson-orin", VISION_PROFILES,
                                                        engine="engines/jetson-agx-orin-64gb/vision_dla.engine",
                                                        dla_core=0)]
    json_path, sh_path = write_build_bundle(tmp_path, builds, "jetson-orin", meta={"bundle": "llava-7b"})
    assert os.access(sh_path, os.X_OK)
    plan = json.loads(json_path.read_text())
    assert (plan["target"], plan["sm"], plan["tensorrt_expected"]) == ("jetson-agx-orin-64gb", "8.7", "10.3")
    assert plan["meta"] == {"bundle": "llava-7b"}
    from_json = [GraphBuild.from_dict(d) for d in plan["builds"]]
    from_sh = parse_build_script(sh_path.read_text())
    assert from_sh == from_json == builds
    # profiles and precisions exactly, as the device will see them
    assert [b.profiles for b in from_sh] == [b.profiles for b in builds]
    assert [(b.strongly_typed, b.fp16, b.int8, b.calib_cache) for b in from_sh] == \
        [(True, False, False, None)] * 3 + [(False, True, False, None)]
    assert subprocess.run(["bash", "-n", str(sh_path)]).returncode == 0
    # no temporary siblings left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.json", "build.sh"]


def test_bundle_refuses_a_plan_rendered_for_another_tensorrt(tmp_path):
    xavier_builds = [make_build("vision", "fp16", "jetson-agx-xavier", VISION_PROFILES)]
    with pytest.raises(UsageError, match="TensorRT 8.5"):
        write_build_bundle(tmp_path, xavier_builds, "jetson-orin")
    with pytest.raises(UsageError, match="relative"):
        write_build_bundle(tmp_path, [make_build("vision", "fp16", "jetson-orin", VISION_PROFILES,
                                                 onnx="/abs/vision.onnx")], "jetson-orin")
    assert not (tmp_path / "build.sh").exists()


def test_profile_run_command_uses_the_tensorrt_10_profile_selector():
    b = make_build("target", "fp16", "jetson-orin", TARGET_PROFILES)
    argv = trtexec_profile_command(b, {"inputs_embeds": (1, 64, H), "position_ids": (1, 64)}, profile_index=1)
    assert "--useProfile=1" in argv and "--shapes=inputs_embeds:1x64x4096,position_ids:1x64" in argv
    assert "--exportProfile=engines/jetson-agx-orin-64gb/target.profile1.json" in argv


# ------------------------------------------------------------------------------------ build.sh


def _stub_tools(bin_dir: Path, version_code: str, fail: bool = False) -> None:
    """A stand-in `trtexec` (banner + placeholder engine bytes), NOT TensorRT: it tests build.sh only."""
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "trtexec"
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version_code}] [b1] # trtexec $*"
        {"exit 3" if fail else ""}
        for a in "$@"; do case "$a" in --saveEngine=*) printf 'placeholder' > "${{a#--saveEngine=}}";; esac; done
        """))
    stub.chmod(0o755)


def _bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    builds = [make_build("vision", "fp16", "jetson-orin", VISION_PROFILES),
              make_build("draft", "fp16", "jetson-orin", DRAFT_PROFILES)]
    write_build_bundle(bundle, builds, "jetson-orin")
    (bundle / "onnx-fp16").mkdir()
    for c in ("vision", "draft"):
        (bundle / "onnx-fp16" / f"{c}.onnx").write_bytes(b"graph " + c.encode())
    return bundle


def _run(bundle: Path, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(bundle / "build.sh")], env={"PATH": path, "HOME": str(bundle)},
                          capture_output=True, text=True, timeout=60)


SYSTEM_PATH = "/usr/bin:/bin"
needs_tools = pytest.mark.skipif(not all(shutil.which(t, path=SYSTEM_PATH) for t in ("bash", "sha256sum", "grep")),
                                 reason="coreutils/grep not in /usr/bin:/bin")


@needs_tools
def test_build_sh_without_trtexec_says_how_to_get_it(tmp_path):
    bundle = _bundle(tmp_path)
    r = _run(bundle, SYSTEM_PATH)
    assert r.returncode == 1 and "trtexec not found" in r.stderr and "/usr/src/tensorrt/bin" in r.stderr


@needs_tools
def test_build_sh_refuses_the_wrong_jetpack(tmp_path):
    bundle = _bundle(tmp_path)
    _stub_tools(tmp_path / "bin", "8502")  # TensorRT 8.5.2: a JetPack 5 device
    r = _run(bundle, f"{tmp_path / 'bin'}:{SYSTEM_PATH}")
    assert r.returncode == 1
    assert "targets TensorRT 10.3" in r.stderr and "TensorRT 8.5" in r.stderr
    assert not (bundle / "engines").exists()  # refused before anything was touched


@needs_tools
def test_build_sh_writes_engine_metadata_last_and_restores_on_failure(tmp_path):
    bundle = _bundle(tmp_path)
    _stub_tools(tmp_path / "bin", "100300")
    r = _run(bundle, f"{tmp_path / 'bin'}:{SYSTEM_PATH}")
    assert r.returncode == 0, r.stderr
    assert "==> vision: trtexec --onnx=onnx-fp16/vision.onnx" in r.stdout
    engine = bundle / "engines/jetson-agx-orin-64gb/vision.engine"
    meta = json.loads((bundle / "engines/jetson-agx-orin-64gb/vision.json").read_text())
    assert meta["sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert (meta["component"], meta["tensorrt_version"], meta["target"]) == ("vision", "10.3", "jetson-agx-orin-64gb")
    assert meta["onnx_sha256"] == hashlib.sha256(b"graph vision").hexdigest()

    _stub_tools(tmp_path / "bin", "100300", fail=True)  # the next build fails
    r2 = _run(bundle, f"{tmp_path / 'bin'}:{SYSTEM_PATH}")
    assert r2.returncode == 1 and "previous engine" in r2.stderr
    assert engine.read_bytes() == b"placeholder"  # the previous engine and its marker are back
    assert json.loads((bundle / "engines/jetson-agx-orin-64gb/vision.json").read_text())["sha256"] == meta["sha256"]


def test_parser_tells_the_trtexec_dialect_apart_and_rejects_unknown_options():
    legacy = trtexec_command(make_build("vision", "int8", "jetson-agx-xavier", VISION_PROFILES))
    modern = trtexec_command(make_build("vision", "fp16", "l4", VISION_PROFILES))
    assert parse_trtexec_command(legacy).trt_version == (8, 5)
    assert parse_trtexec_command(modern).trt_version[0] == 10
    with pytest.raises(UsageError, match="unsupported trtexec option"):
        parse_trtexec_command(modern + ["--best"])
    with pytest.raises(UsageError, match="--saveEngine"):
        parse_trtexec_command(["trtexec", "--onnx=onnx/target.onnx"])
