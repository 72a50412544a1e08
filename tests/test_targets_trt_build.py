"""TensorRT Python API build path: which path `build` takes and why, the flags each graph gets, Q/DQ
detection; and, where TensorRT and a GPU are present, a real build whose engines the TensorRT backend
runs to the same tokens as ONNX Runtime (skipped with the reason elsewhere; nothing fakes TensorRT)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dream_export.errors import UsageError
from dream_export.targets.registry import all_targets, get_target
from dream_export.targets.trt_build import (
    EngineFlags,
    choose_build_path,
    engine_flags,
    graph_has_qdq,
    local_target,
)
from dream_export.targets.trtexec import make_build

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # pragma: no cover
    from bundle_fixture import cached_tiny_bundle

PROFILE = [{"x": ((1, 8), (4, 8), (16, 8))}]


def test_path_is_the_api_only_with_tensorrt_and_a_gpu_of_the_targets_sm():
    nano, h100 = get_target("jetson-orin-nano-8gb"), get_target("h100")
    no_trt = choose_build_path(nano, None, None)
    assert not no_trt.api and "tensorrt is not importable" in no_trt.reason
    no_gpu = choose_build_path(h100, "10.8.0.43", None)
    assert not no_gpu.api and "no NVIDIA GPU" in no_gpu.reason
    other = choose_build_path(nano, "10.8.0.43", ("NVIDIA H100 80GB HBM3", "9.0"))
    assert not other.api and "SM 9.0" in other.reason and "SM 8.7" in other.reason
    here = choose_build_path(h100, "10.8.0.43", ("NVIDIA H100 80GB HBM3", "9.0"))
    assert here.api and "match h100" in here.reason
    jp6 = choose_build_path(nano, "8.6.2.3", ("Orin", "8.7"))  # a JetPack 6.0 board
    assert jp6.api and "installed TensorRT 8.6" in jp6.reason
    with pytest.raises(UsageError, match="nothing to build"):
        choose_build_path(get_target("cpu"), "10.8.0.43", ("x", "9.0"))


def test_flags_follow_the_installed_tensorrt_and_the_graph():
    nano = get_target("jetson-orin-nano-8gb")
    fp16 = make_build("target", "fp16", nano, PROFILE)
    assert engine_flags(fp16, "10.3.0.30", False) == EngineFlags(fp16=True)
    assert engine_flags(fp16, "8.5.2.2", False) == EngineFlags(fp16=True, explicit_batch=True)
    # a Q/DQ graph is strongly typed on TensorRT >= 9, explicit INT8 (+FP16 fallback) on 8.x
    qdq = make_build("target", "int8", nano, PROFILE)
    assert qdq.strongly_typed and engine_flags(qdq, "10.3.0.30", True) == EngineFlags(strongly_typed=True)
    assert engine_flags(qdq, "8.6.2.3", True) == EngineFlags(fp16=True, int8=True, explicit_batch=True)
    with pytest.raises(UsageError, match="no QuantizeLinear"):
        engine_flags(qdq, "10.3.0.30", False)
    # implicit INT8 from the calibration cache: the TensorRT 8.x plan of the same target
    jp5 = make_build("target", "int8", nano.with_jetpack("5.1"), PROFILE)
    assert engine_flags(jp5, "8.5.2.2", False) == EngineFlags(fp16=True, int8=True, calib_cache="calib/target.cache",
                                                             explicit_batch=True)
    with pytest.raises(UsageError, match="Q/DQ graph"):
        engine_flags(jp5, "10.3.0.30", False)


def test_local_target_renders_the_installed_tensorrts_dialect():
    nano = get_target("jetson-orin-nano-8gb")
    assert make_build("draft", "int8", local_target(nano, "8.5.2.2"), PROFILE).calib_cache == "calib/draft.cache"
    assert make_build("draft", "int8", local_target(nano, "10.3.0.30"), PROFILE).strongly_typed


def _tiny_onnx(path, qdq: bool) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["xq" if qdq else "x", "w"], ["y"])]
    inits = [w]
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xq"])] + nodes
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)
    (path).write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def test_qdq_graphs_are_detected_with_and_without_the_onnx_package(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    plain, quant = tmp_path / "plain.onnx", tmp_path / "quant.onnx"
    _tiny_onnx(plain, False)
    _tiny_onnx(quant, True)
    assert graph_has_qdq(quant) and not graph_has_qdq(plain)
    monkeypatch.setitem(sys.modules, "onnx", None)  # a runtime-only install: byte scan
    assert graph_has_qdq(quant) and not graph_has_qdq(plain)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory.mktemp("tiny"))


def test_build_says_which_path_it_took_and_why(bundle):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here: the API path test covers this host")
    r = subprocess.run([sys.executable, "-m", "dream_export.cli", "build", str(bundle), "--target", "h100"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "build path: build.sh for the device (tensorrt is not importable on this host)" in r.stdout
    assert (bundle / "engines" / "h100" / "build.sh").exists()


def _local_gpu_target():
    """The registry target of the local GPU, or skip with the reason (TensorRT, a GPU, a known SM)."""
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this host; the API build path "
                                                 "runs where it is (pip install 'dream-export[trt]')")
    pytest.importorskip("cuda", reason="cuda-python is not installed (pip install 'dream-export[trt]')")
    from dream_export.runtime.engine_meta import probe_gpu

    gpu = probe_gpu()
    if gpu is None:
        pytest.skip("tensorrt imports but no NVIDIA GPU is visible")
    match = [t for t in all_targets() if t.sm == gpu[1] and t.kind != "cpu"]
    if not match:
        pytest.skip(f"no registry target has SM {gpu[1]} ({gpu[0]})")
    return trt, gpu, match[0]


def test_tensorrt_api_build_runs_like_onnx_runtime(tmp_path, bundle):
    import shutil

    trt, gpu, target = _local_gpu_target()
    from dream_export.runtime.backends import OnnxRuntimeBackend
    from dream_export.runtime.bundle import Bundle
    from dream_export.runtime.engine_meta import DeviceInfo
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.trt_backend import TensorRTBackend
    from dream_export.targets.bundle_builds import bundle_builds
    from dream_export.targets.trt_build import build_engines, detect_build_path

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    path = detect_build_path(target)
    assert path.api, path.reason
    here = local_target(target, trt.__version__)
    manifest = json.loads((b / "manifest.json").read_text())
    builds = bundle_builds(manifest, here, "fp32", timing_cache=f"engines/{target.name}/timing.cache")
    out = b / "engines" / target.name
    record = json.loads(build_engines(builds, b, here, DeviceInfo(trt.__version__, gpu[1], gpu[0]), out,
                                      log=lambda _s: None).read_text())
    assert [e["component"] for e in record["engines"]] == ["vision", "target", "draft"]
    meta = json.loads((out / "target.json").read_text())
    assert meta["tensorrt_version"] == trt.__version__ and meta["compute_cap"] == gpu[1]
    assert meta["plan"]["profiles"] == builds[1].to_dict()["profiles"] and len(meta["plan"]["profiles"]) == 2
    assert (out / "timing.cache").stat().st_size > 0
    bun = Bundle.open(b)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ort_tokens = Pipeline(bun, OnnxRuntimeBackend(bun)).generate(image, "hello", max_new_tokens=12, tree="2,4,8").tokens
    trt_backend = TensorRTBackend(bun)
    assert trt_backend.engine_dir == out
    trt_tokens = Pipeline(bun, trt_backend).generate(image, "hello", max_new_tokens=12, tree="2,4,8").tokens
    assert trt_tokens[:4] == ort_tokens[:4]  # fp32 engines; TF32 GEMMs may flip a late near-tie
