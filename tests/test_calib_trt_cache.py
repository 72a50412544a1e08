"""TensorRT calibration caches: the text format, the parser, and a real cache naming the graph's tensors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from dream_export.calib.trt_cache import format_cache, hex_to_scale, parse_cache, scale_to_hex, version_number
from dream_export.errors import IncompatibleArtifactError, UsageError

try:
    from tests.calib_fixture import calibrated
except ImportError:  # tests/ itself on sys.path
    from calib_fixture import calibrated


def test_format_matches_tensorrt_text_cache():
    text = format_cache({"input": 2.6454, "/layer/MatMul_output_0": 0.0, "b": 127.0}, "8.6.1")
    lines = text.splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    # sorted names, 'name: 8 hex digits' of the big-endian float32 bits of amax / 127
    assert lines[1:] == ["/layer/MatMul_output_0: 00000000", "b: 3f800000",
                         f"input: {struct.pack('>f', np.float32(2.6454 / 127)).hex()}"]
    assert hex_to_scale("3caa54fc") == pytest.approx(0.020792, rel=1e-4)  # a scale TensorRT itself wrote


@pytest.mark.parametrize("version,number", [("8.5.2", 8502), ("8.6.1", 8601), ("10.3.0", 100300), ("10.14.1", 101401)])
def test_header_version_numbers(version, number):
    assert version_number(version) == number


def test_round_trip_recovers_every_scale():
    rng = np.random.default_rng(0)
    amax = {f"t{i}": float(v) for i, v in enumerate(10.0 ** rng.uniform(-6, 6, 500))}
    header, scales = parse_cache(format_cache(amax))
    assert header.startswith("TRT-8502-") and set(scales) == set(amax)
    for name, a in amax.items():
        assert scales[name] == pytest.approx(a / 127.0, rel=1e-6)
        assert scale_to_hex(scales[name]) == scale_to_hex(a / 127.0)


def test_bad_caches_and_versions_are_clear_errors():
    with pytest.raises(IncompatibleArtifactError, match="first line"):
        parse_cache("input: 3caa54fc\n")
    with pytest.raises(IncompatibleArtifactError, match="line 2"):
        parse_cache("TRT-8502-EntropyCalibration2\ninput 3caa54fc\n")
    with pytest.raises(UsageError):
        version_number("seven")


def test_real_cache_names_exactly_graph_tensors(demo_bundle, tmp_path_factory):
    import onnx

    out = calibrated(demo_bundle, tmp_path_factory.mktemp("calib"))
    manifest = json.loads((out / "manifest.json").read_text())
    for comp in ("target", "draft"):
        info = manifest["calibration"]["components"][comp]
        header, scales = parse_cache(out / info["trt_cache"])
        assert header == "TRT-8502-EntropyCalibration2" and len(scales) == info["trt_cache_tensors"] > 50
        # the cache's tensors are tensors of the fp32 graph TensorRT builds from
        graph = onnx.load(str(out / info["fp32_file"])).graph
        tensors = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
        assert set(scales) <= tensors
        # ... never the runtime-owned KV cache, integer/bool tensors or mask fill values
        kv = {t for r, t in manifest["graphs"][comp]["bindings"].items() if r.endswith(("key", "value"))}
        assert not set(scales) & kv
        assert all(0.0 <= s < 1e28 for s in scales.values())
        # and each scale is the recorded amax / 127 (within float32 rounding)
        amax = json.loads((out / f"calib/{comp}.amax.json").read_text())
        assert set(amax) == set(scales)
        for name, a in amax.items():
            assert scales[name] == pytest.approx(a / 127.0, rel=1e-6)
