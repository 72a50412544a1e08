"""Engine identity: the runtime refuses engines built for another GPU or TensorRT, with the reason; profile
selection for multi-profile engines. Pure Python: no TensorRT needed."""

from __future__ import annotations

import json

import pytest

from dream_export.errors import IncompatibleArtifactError, MissingBackendError, UsageError
from dream_export.io import file_digest
from dream_export.runtime.engine_meta import (
    DeviceInfo,
    check_engine,
    meta_path,
    mismatch_reasons,
)
from dream_export.runtime.trt_backend import choose_profile, find_engine_dir

# What build.sh writes on a Jetson (nvidia-smi there reports no compute_cap: the SM comes from the registry;
# trtexec gives major.minor).
JETSON_META = {"format": "dream-export-engine/1", "component": "target", "engine": "target.engine",
               "sha256": "0" * 64, "bytes": 1234, "onnx": "onnx-fp16/target.onnx", "onnx_sha256": "1" * 64,
               "target": "jetson-orin-nano-8gb", "tensorrt_version": "10.3", "compute_cap": "8.7", "gpu": "Orin",
               "built_at": "2025-01-01T00:00:00Z"}
# What the TensorRT Python API path writes on an H100.
H100_META = {**JETSON_META, "target": "h100", "tensorrt_version": "10.8.0.43", "compute_cap": "9.0",
             "gpu": "NVIDIA H100 80GB HBM3", "builder": "tensorrt-python"}

ORIN = DeviceInfo("10.3.0.30", "8.7", "Orin")
H100 = DeviceInfo("10.8.0.43", "9.0", "NVIDIA H100 80GB HBM3")


def test_matching_engines_are_accepted():
    assert mismatch_reasons(JETSON_META, ORIN, "target") == []  # SM from the registry, TensorRT on major.minor
    assert mismatch_reasons(H100_META, H100, "target") == []


def test_wrong_gpu_is_refused_naming_both_sms():
    reasons = mismatch_reasons(JETSON_META, H100, "target")
    assert any("SM 8.7" in r and "SM 9.0" in r for r in reasons)
    assert any("TensorRT 10.3" in r and "10.8.0.43" in r for r in reasons)


def test_other_tensorrt_release_is_refused():
    # same GPU, patch release differs: the API path records the full version, which must match exactly
    reasons = mismatch_reasons(H100_META, DeviceInfo("10.8.1.2", "9.0"), "target")
    assert len(reasons) == 1 and "not portable across TensorRT releases" in reasons[0]
    # build.sh records major.minor only: a patch release of the same minor is accepted
    assert mismatch_reasons(JETSON_META, DeviceInfo("10.3.1", "8.7"), "target") == []
    assert mismatch_reasons(JETSON_META, DeviceInfo("8.5.2.2", "8.7"), "target")


def test_incomplete_or_foreign_metadata_is_refused():
    assert any("does not record the TensorRT version" in r
               for r in mismatch_reasons({**JETSON_META, "tensorrt_version": "unknown"}, ORIN))
    assert any("format" in r for r in mismatch_reasons({**JETSON_META, "format": "other/1"}, ORIN))
    assert any("no compute capability" in r
               for r in mismatch_reasons({**JETSON_META, "target": "my-board", "compute_cap": ""}, ORIN))
    assert any("not the draft graph" in r for r in mismatch_reasons(JETSON_META, ORIN, "draft"))


def test_check_engine_reads_the_file_and_its_digest(tmp_path):
    engine = tmp_path / "target.engine"
    engine.write_bytes(b"serialized engine bytes")
    with pytest.raises(IncompatibleArtifactError, match="has no metadata"):
        check_engine(engine, ORIN, "target")
    meta = {**JETSON_META, "sha256": file_digest(engine)}
    meta_path(engine).write_text(json.dumps(meta))
    assert check_engine(engine, ORIN, "target")["target"] == "jetson-orin-nano-8gb"
    engine.write_bytes(b"serialized engine bytes, edited")
    with pytest.raises(IncompatibleArtifactError, match="sha256") as e:
        check_engine(engine, ORIN, "target")
    assert "Rebuild" in str(e.value) and "\n" not in str(e.value)
    meta_path(engine).write_text("{not json")
    with pytest.raises(IncompatibleArtifactError, match="not valid JSON"):
        check_engine(engine, ORIN, "target")


def test_engine_directory_is_chosen_by_the_running_device(tmp_path):
    for target, meta in (("h100", H100_META), ("jetson-orin-nano-8gb", JETSON_META)):
        d = tmp_path / "engines" / target
        d.mkdir(parents=True)
        for g in ("vision", "target", "draft"):
            (d / f"{g}.engine").write_bytes(b"x")
            (d / f"{g}.json").write_text(json.dumps({**meta, "component": g}))
    assert find_engine_dir(tmp_path, ORIN).name == "jetson-orin-nano-8gb"
    assert find_engine_dir(tmp_path, H100).name == "h100"
    with pytest.raises(IncompatibleArtifactError) as e:
        find_engine_dir(tmp_path, DeviceInfo("10.3.0.30", "8.9", "L4"))
    assert "h100:" in str(e.value) and "jetson-orin-nano-8gb:" in str(e.value) and "SM 8.9" in str(e.value)


def test_profile_choice_prefers_the_tightest_profile_that_fits():
    kv = ((24, 1, 2, 64, 32), (24, 1, 2, 64, 32))
    prefill = {"inputs_embeds": ((1, 1, 128), (1, 64, 128)), "past_key": kv}
    verify = {"inputs_embeds": ((1, 1, 128), (1, 16, 128)), "past_key": kv}
    ranges = [prefill, verify]
    assert choose_profile(ranges, {"inputs_embeds": (1, 40, 128), "past_key": kv[0]}) == 0
    assert choose_profile(ranges, {"inputs_embeds": (1, 1, 128), "past_key": kv[0]}) == 1  # decode: verify profile
    assert choose_profile(ranges, {"inputs_embeds": (1, 16, 128), "past_key": kv[0]}) == 1
    with pytest.raises(UsageError, match="fit no optimization profile"):
        choose_profile(ranges, {"inputs_embeds": (1, 65, 128), "past_key": kv[0]})
    with pytest.raises(UsageError):
        choose_profile(ranges, {"inputs_embeds": (1, 8, 128), "past_key": (24, 1, 2, 32, 32)})


def test_tensorrt_backend_without_tensorrt_says_what_to_install(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here; the refusal path does not apply")
    from dream_export.runtime.trt_backend import TensorRTBackend

    with pytest.raises(MissingBackendError, match="tensorrt"):
        TensorRTBackend(bundle=None)  # type: ignore[arg-type]  # refused before the bundle is read


def test_tensorrt_backend_and_build_modules_import_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import dream_export.runtime.trt_backend, dream_export.runtime.engine_meta, "
            "dream_export.targets.trt_build, dream_export.targets.latency, dream_export.targets.measure; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("reported", ["N/A", "[N/A]", "", "Orin"])
def test_na_compute_cap_is_refused_with_the_remedy_never_compared(reported):
    # JetPack 6's nvidia-smi prints N/A for compute_cap: build.sh records the CUDA runtime's or the
    # registry's SM instead; metadata without a valid SM is refused with what to do, never compared as "N/A"
    from dream_export.runtime.engine_meta import valid_sm

    assert valid_sm(reported) is None and valid_sm("8.7") == "8.7"
    meta = {**JETSON_META, "compute_cap": reported}
    reasons = mismatch_reasons(meta, ORIN)
    assert len(reasons) == 1 and "records no compute capability" in reasons[0] and "build.sh" in reasons[0]


def test_engine_metadata_does_not_import_the_build_plans():
    # runtime -> targets.trtexec -> ... -> runtime was a cycle; the metadata format lives in the runtime now
    import subprocess
    import sys

    code = ("import sys, dream_export.runtime.engine_meta as m; "
            "assert 'dream_export.targets.trtexec' not in sys.modules, sorted(sys.modules); print(m.ENGINE_META_FORMAT)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "dream-export-engine/1", r.stderr
