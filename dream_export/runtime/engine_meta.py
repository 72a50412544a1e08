"""Engine identity: the metadata JSON beside every TensorRT engine, and the check that refuses a mismatch.

A serialized TensorRT engine runs only under the TensorRT release that built it and on GPUs of the
compute capability it was built for; loading it anywhere else fails deep inside TensorRT with a
message that names neither. Both build paths (the bundle's `build.sh` through trtexec, and the
TensorRT Python API in `dream_export.targets.trt_build`) write `<engine stem>.json` as their last
step, with the engine's sha256, the TensorRT version, the GPU and its SM; the runtime compares that
record with the running device before it deserializes anything.

Pure Python: no TensorRT and no CUDA import here except in `probe_device`, so the check is testable
(and usable in reports) on any host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dream_export.errors import IncompatibleArtifactError, MissingBackendError
from dream_export.io import file_digest

# The metadata format both build paths write (build.sh renders it from here too). It lives in this
# runtime module, not with the build plans, so the runtime imports nothing from `targets`' plan code.
ENGINE_META_FORMAT = "dream-export-engine/1"


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine must match: the TensorRT release and the GPU's compute capability."""

    tensorrt_version: str  # e.g. "10.3.0.30" (tensorrt.__version__)
    sm: str  # "major.minor", e.g. "8.7"
    gpu: str = ""


def meta_path(engine: str | Path) -> Path:
    """`<engine stem>.json` beside `engine` (engines/jetson-orin/target.engine -> target.json)."""
    p = Path(engine)
    return p.with_suffix(".json") if p.suffix == ".engine" else p.with_name(p.name + ".json")


def read_metadata(engine: str | Path) -> dict:
    """The metadata of `engine`; refuses an engine without one (a build that did not finish)."""
    path = meta_path(engine)
    if not path.exists():
        raise IncompatibleArtifactError(
            f"{engine} has no metadata ({path.name}): the build did not finish or the engine was not built by "
            "dream-export; rebuild it with `dream-export build` or the bundle's build.sh")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IncompatibleArtifactError(f"{path} is not valid JSON ({e.msg}); rebuild the engine") from e
    if not isinstance(meta, dict):
        raise IncompatibleArtifactError(f"{path} is not an engine metadata object; rebuild the engine")
    return meta


def _version_parts(version: str) -> list[int] | None:
    try:
        return [int(p) for p in str(version).split(".") if p != ""]
    except ValueError:
        return None


def valid_sm(text: str | None) -> str | None:
    """`text` when it reads as a compute capability ("8.7"), else None: JetPack 6's nvidia-smi prints
    "N/A" / "[N/A]" for compute_cap, which must never be recorded or compared as an SM."""
    sm = str(text or "").strip()
    major, dot, minor = sm.partition(".")
    return sm if dot and major.isdigit() and minor.isdigit() else None


def _recorded_sm(meta: dict) -> str:
    """The SM the engine was built for ("" when the metadata holds none that reads as an SM). build.sh
    records the CUDA runtime's SM, or on a Jetson the module's registry SM, where nvidia-smi prints
    "N/A" (JetPack 6), so a valid build always records one."""
    return valid_sm(meta.get("compute_cap")) or valid_sm(meta.get("sm")) or ""


def mismatch_reasons(meta: dict, device: DeviceInfo, component: str | None = None,
                     engine_sha256: str | None = None) -> list[str]:
    """Every reason the engine described by `meta` cannot run on `device` (empty: it can).

    TensorRT versions are compared on the components the metadata records: engines from the API path
    record the full version (10.3.0.30) and must match it exactly; build.sh records major.minor (what
    trtexec's banner gives) and is compared on those. `engine_sha256`, when given, must equal the
    recorded digest (a truncated or replaced engine file).
    """
    reasons: list[str] = []
    if meta.get("format") != ENGINE_META_FORMAT:
        reasons.append(f"metadata format is {meta.get('format')!r}, expected {ENGINE_META_FORMAT!r}")
    if component is not None and meta.get("component") not in (None, component):
        reasons.append(f"engine is the {meta.get('component')} graph, not the {component} graph")
    built = str(meta.get("tensorrt_version") or "")
    want, have = _version_parts(built), _version_parts(device.tensorrt_version)
    if not built or want is None or len(want) < 2:
        reasons.append(f"metadata does not record the TensorRT version that built the engine ({built or 'missing'})")
    elif have is None or have[: len(want)] != want:
        reasons.append(f"engine was built with TensorRT {built}, this host runs TensorRT {device.tensorrt_version} "
                       "(engines are not portable across TensorRT releases)")
    sm = _recorded_sm(meta)
    if not sm:
        reasons.append("metadata records no compute capability (SM); rebuild with this version's build.sh, which "
                       "reads it from the CUDA runtime or the target registry")
    elif sm != device.sm:
        where = f" ({meta['gpu']})" if meta.get("gpu") else ""
        reasons.append(f"engine was built for SM {sm}{where}, this GPU is SM {device.sm}"
                       f"{' (' + device.gpu + ')' if device.gpu else ''}")
    if engine_sha256 is not None and meta.get("sha256") and meta["sha256"] != engine_sha256:
        reasons.append("engine file does not match the sha256 in its metadata (edited, truncated or replaced)")
    return reasons


def check_engine(engine: str | Path, device: DeviceInfo, component: str | None = None,
                 verify_digest: bool = True) -> dict:
    """Refuse (`IncompatibleArtifactError`, all reasons in one line) or return the engine's metadata."""
    meta = read_metadata(engine)
    digest = file_digest(engine) if verify_digest else None
    reasons = mismatch_reasons(meta, device, component, digest)
    if reasons:
        raise IncompatibleArtifactError(f"refusing {engine}: {'; '.join(reasons)}. Rebuild the engines on this "
                                        "device with `dream-export build` (or the bundle's build.sh)")
    return meta


def _probe_libcudart() -> tuple[str, str] | None:
    """(GPU name, SM) from the CUDA runtime library through ctypes: every JetPack and CUDA install has
    libcudart, while cuda-python may be missing and JetPack 6's nvidia-smi prints N/A for compute_cap."""
    import ctypes
    import ctypes.util

    names = [n for n in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12", "libcudart.so.11.0")
             if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 (driver_types.h)
        if lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) or lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0):
            return None
        return "", f"{major.value}.{minor.value}"
    return None


def probe_gpu() -> tuple[str, str] | None:
    """(GPU name, SM) of device 0 without torch: cuda-python when installed, else the CUDA runtime
    library (ctypes), else `nvidia-smi`; None when none finds a GPU. The SM never comes from an
    nvidia-smi "N/A" (JetPack 6)."""
    try:
        cudart = load_cudart()
        err, prop = cudart.cudaGetDeviceProperties(0)
        if err == cudart.cudaError_t.cudaSuccess:
            name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
            return name, f"{prop.major}.{prop.minor}"
    except MissingBackendError:
        pass
    found = _probe_libcudart()
    if found is not None:
        return found
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    name, _, sm = line.rpartition(",")
    return (name.strip(), sm.strip()) if name and valid_sm(sm) else None


def probe_device() -> DeviceInfo:
    """The running TensorRT and GPU; `MissingBackendError` when either is absent."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingBackendError("tensorrt is not installed: on a Jetson it comes with JetPack "
                                  "(python3-libnvinfer); elsewhere pip install 'dream-export[trt]'") from e
    gpu = probe_gpu()
    if gpu is None:
        raise MissingBackendError("no NVIDIA GPU found (cuda-python and nvidia-smi see none)")
    return DeviceInfo(str(trt.__version__), gpu[1], gpu[0])


def load_cudart():
    """The CUDA runtime binding of cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 12.6
        except ImportError as e:
            raise MissingBackendError("the TensorRT backend needs cuda-python: pip install 'dream-export[trt]'") from e
    return cudart
