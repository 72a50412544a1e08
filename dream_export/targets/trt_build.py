"""Engines built in-process with the TensorRT Python API, when this host is the device.

The engines are described by the same `GraphBuild` objects `build.sh` renders into trtexec lines
(`bundle_builds` → `make_build`): the same ONNX file, optimization profiles, precision flags,
workspace, DLA core, timing cache and optimization level. Only the executor differs, so the two
paths cannot drift apart.

What the API path adds over the plan:
- the precision flags follow the *installed* TensorRT (`engine_flags`): a Q/DQ graph (QuantizeLinear /
  DequantizeLinear nodes) becomes a strongly typed network on TensorRT ≥ 9 and an explicitly quantized
  INT8 + FP16 network on 8.x; implicit INT8 on 8.x reads the bundle's calibration cache through an
  `IInt8EntropyCalibrator2` whose `read_calibration_cache` returns the file (no calibration batches);
- progress through `IProgressMonitor` (TensorRT ≥ 10);
- the engine's metadata JSON beside it, in the format `build.sh` writes plus the flags actually used.

Every file is written through a temporary sibling and renamed; the metadata goes last and is removed
first, so an interrupted build leaves an engine the runtime refuses rather than one it trusts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dream_export.errors import DreamExportError, IncompatibleArtifactError, UsageError
from dream_export.io import atomic_write_bytes, atomic_write_text, file_digest
from dream_export.runtime.engine_meta import ENGINE_META_FORMAT, DeviceInfo, meta_path, probe_gpu
from dream_export.targets.registry import Target
from dream_export.targets.trtexec import BUILD_FORMAT, GraphBuild

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------ which path


@dataclass(frozen=True)
class BuildPath:
    """How `dream-export build` proceeds for a target on this host, and why."""

    api: bool  # True: TensorRT Python API here; False: write build.sh for the device
    reason: str
    tensorrt: str | None = None  # installed tensorrt.__version__
    gpu: tuple[str, str] | None = None  # (name, SM) of the local GPU


def choose_build_path(target: Target, tensorrt_version: str | None, gpu: tuple[str, str] | None) -> BuildPath:
    """Decide between building here and writing build.sh, from what was detected (pure).

    The API path needs TensorRT and a local GPU whose SM is the target's: engines are compiled for
    one SM, and a Jetson engine must come from the Jetson's own TensorRT.
    """
    if target.trt_version is None:
        raise UsageError(f"{target.name} runs ONNX Runtime, not TensorRT: there is nothing to build")
    if tensorrt_version is None:
        return BuildPath(False, "tensorrt is not importable on this host", None, gpu)
    if gpu is None:
        return BuildPath(False, f"tensorrt {tensorrt_version} is installed but no NVIDIA GPU is visible",
                         tensorrt_version, None)
    name, sm = gpu
    if sm != target.sm:
        return BuildPath(False, f"the local GPU is {name} (SM {sm}), {target.name} is SM {target.sm}",
                         tensorrt_version, gpu)
    note = ""
    local = ".".join(tensorrt_version.split(".")[:2])
    if target.tensorrt and local != target.tensorrt and target.kind == "jetson":
        note = f"; engines are for the installed TensorRT {local} (the target's default JetPack ships {target.tensorrt})"
    return BuildPath(True, f"tensorrt {tensorrt_version} and {name} (SM {sm}) match {target.name}{note}",
                     tensorrt_version, gpu)


def detect_build_path(target: Target) -> BuildPath:
    """`choose_build_path` with TensorRT and the GPU probed on this host (no torch, no CUDA context
    unless cuda-python is installed)."""
    try:
        import tensorrt as trt

        version: str | None = str(trt.__version__)
    except ImportError:
        version = None
    return choose_build_path(target, version, probe_gpu() if version else None)


def local_target(target: Target, tensorrt_version: str) -> Target:
    """`target` with the installed TensorRT's major.minor, so `make_build` picks the flag dialect
    (strongly typed Q/DQ on 10.x, implicit INT8 on 8.x) of the TensorRT that will do the build."""
    return dataclasses.replace(target, tensorrt=".".join(tensorrt_version.split(".")[:2]))


# ------------------------------------------------------------------------------------ flags


@dataclass(frozen=True)
class EngineFlags:
    """Network-creation and builder flags of one engine build, as recorded in its metadata."""

    strongly_typed: bool = False
    fp16: bool = False
    int8: bool = False
    calib_cache: str | None = None
    explicit_batch: bool = False  # TensorRT 8.x needs it for ONNX; 10.x ignores it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def graph_has_qdq(onnx_path: str | Path) -> bool:
    """Whether the ONNX graph holds QuantizeLinear/DequantizeLinear nodes (an explicitly quantized graph).

    Uses `onnx` (graph only, external weights not loaded) when installed; otherwise scans the
    protobuf bytes for the op names, which a device with only the runtime install can still do.
    """
    try:
        import onnx
    except ImportError:
        with open(onnx_path, "rb") as f:
            tail = b""
            for chunk in iter(lambda: f.read(1 << 20), b""):
                if b"QuantizeLinear" in tail + chunk:  # also matches DequantizeLinear
                    return True
                tail = chunk[-16:]
        return False
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def engine_flags(build: GraphBuild, tensorrt_version: str, has_qdq: bool) -> EngineFlags:
    """The flags for `build` under the installed TensorRT, given whether its graph is Q/DQ (pure)."""
    major = int(str(tensorrt_version).split(".")[0])
    explicit = major < 10
    if has_qdq:
        if major >= 9:
            return EngineFlags(strongly_typed=True, explicit_batch=explicit)
        # 8.x explicit quantization: INT8 enables the Q/DQ kernels, FP16 keeps the rest out of FP32
        return EngineFlags(fp16=True, int8=True, explicit_batch=True)
    if build.strongly_typed:
        raise UsageError(f"{build.component}: {build.onnx} has no QuantizeLinear nodes but the plan expects a Q/DQ "
                         f"graph ({build.precision}); run `dream-export calibrate` first or build --precision fp16")
    if build.int8 and not build.calib_cache:
        raise UsageError(f"{build.component}: implicit INT8 needs the calibration cache (calib/{build.component}"
                         ".cache from `dream-export calibrate`)")
    if build.int8 and major >= 10:
        raise UsageError(f"{build.component}: TensorRT {tensorrt_version} builds INT8 from the Q/DQ graph "
                         "(strongly typed), not from a calibration cache; run `dream-export calibrate`")
    return EngineFlags(fp16=build.fp16, int8=build.int8, calib_cache=build.calib_cache if build.int8 else None,
                       explicit_batch=explicit)


# ------------------------------------------------------------------------------------ building


def _progress_monitor(trt, log: Log, component: str):
    """An `IProgressMonitor` logging top-level phases with their duration (None before TensorRT 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT calls from several builder threads
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self._start[phase_name] = time.perf_counter()
                if parent_phase is None:
                    log(f"    {component}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self._lock:
                t0 = self._start.pop(phase_name, None)
                if t0 is not None and time.perf_counter() - t0 > 5.0:
                    log(f"    {component}: {phase_name} done in {time.perf_counter() - t0:.0f} s")

    return Monitor()


def _cache_calibrator(trt, cache: bytes):
    """Implicit-INT8 calibrator that only replays the calibration cache (TensorRT 8.x)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):  # the algorithm the cache header names
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None  # no data: TensorRT must take every scale from the cache

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, cache_data):
            return None

    return CacheCalibrator()


def _check_profiles(network, build: GraphBuild) -> None:
    """The plan's profiles name exactly the network's inputs (a re-exported graph would not)."""
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for i, p in enumerate(build.profiles):
        extra, missing = set(p) - inputs, inputs - set(p)
        if extra or missing:
            raise IncompatibleArtifactError(
                f"{build.component}: profile {i} does not match {build.onnx} (unknown inputs {sorted(extra)}, "
                f"inputs without shapes {sorted(missing)}); rerun `dream-export build` to regenerate the plan")


def build_engine(build: GraphBuild, bundle_root: str | Path, target: Target, device: DeviceInfo,
                 log: Log = print) -> dict:
    """Build one engine with the TensorRT Python API and write it with its metadata; returns the metadata."""
    import tensorrt as trt

    root = Path(bundle_root)
    onnx_path = root / build.onnx
    if not onnx_path.exists():
        raise UsageError(f"{build.component}: {build.onnx} is missing from the bundle (fp16: `dream-export export "
                         "--precision fp16`; int8: `dream-export calibrate`)")
    flags = engine_flags(build, trt.__version__, graph_has_qdq(onnx_path))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 0
    if flags.explicit_batch:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if flags.strongly_typed:
        if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # 8.x bindings (engine_flags keeps it 9+)
            raise IncompatibleArtifactError(f"{build.component}: TensorRT {trt.__version__} has no strongly typed "
                                            "networks; build the fp32 graph with a calibration cache instead")
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights resolve beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise IncompatibleArtifactError(f"{build.component}: TensorRT {trt.__version__} cannot parse {build.onnx}: "
                                        f"{errors or 'no detail'}")
    _check_profiles(network, build)
    config = builder.create_builder_config()
    if build.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.workspace_mb) << 20)
    if flags.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if flags.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if build.builder_optimization_level is not None:
        if not hasattr(config, "builder_optimization_level"):  # not in the TensorRT 8.5 bindings
            raise UsageError(f"TensorRT {trt.__version__} has no builder optimization level (8.6+); drop --opt-level")
        config.builder_optimization_level = int(build.builder_optimization_level)
    if build.layer_info:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profiles = []
    for p in [] if build.static else build.profiles:  # a static network takes no optimization profile
        prof = builder.create_optimization_profile()
        for name, (mn, op, mx) in p.items():
            prof.set_shape(name, mn, op, mx)
        config.add_optimization_profile(prof)
        profiles.append(prof)
    calibrator = None
    if flags.calib_cache:
        cache_path = root / flags.calib_cache
        if not cache_path.exists():
            raise UsageError(f"{build.component}: calibration cache {flags.calib_cache} is missing; run "
                             "`dream-export calibrate` for this TensorRT version")
        calibrator = _cache_calibrator(trt, cache_path.read_bytes())
        config.int8_calibrator = calibrator
        if profiles:
            config.set_calibration_profile(profiles[0])
    if build.dla_core is not None:
        if builder.num_DLA_cores <= build.dla_core:
            raise UsageError(f"{build.component}: DLA core {build.dla_core} requested, this device has "
                             f"{builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(build.dla_core)
        if build.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    timing_path = root / build.timing_cache if build.timing_cache else None
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path and timing_path.exists() else b"")
    config.set_timing_cache(timing, False)  # a cache from another device/version is refused, not misused
    monitor = _progress_monitor(trt, log, build.component)
    if monitor is not None and hasattr(config, "progress_monitor"):  # TensorRT 10+ (not in 8.5/8.6 bindings)
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DreamExportError(f"{build.component}: TensorRT could not build {build.onnx} (see the TensorRT log "
                               "above; a larger --workspace or fewer tactics via --opt-level may help)")
    seconds = time.perf_counter() - t0
    if timing_path is not None:
        atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
    engine_path = root / build.engine
    meta_file = meta_path(engine_path)
    meta_file.unlink(missing_ok=True)  # no metadata while the engine is being replaced
    atomic_write_bytes(engine_path, bytes(serialized))
    if build.layer_info:
        _write_layer_info(trt, logger, engine_path, root / build.layer_info)
    meta = {
        "format": ENGINE_META_FORMAT, "component": build.component, "engine": engine_path.name,
        "sha256": file_digest(engine_path), "bytes": engine_path.stat().st_size, "onnx": build.onnx,
        "onnx_sha256": file_digest(onnx_path), "target": target.name, "tensorrt_version": str(trt.__version__),
        "compute_cap": device.sm, "gpu": device.gpu,
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "builder": "tensorrt-python", "build_seconds": round(seconds, 1), "flags": flags.to_dict(),
        "plan": build.to_dict(),
    }
    atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")
    del calibrator  # TensorRT holds no reference past the build
    return meta


def _write_layer_info(trt, logger, engine_path: Path, out: Path) -> None:
    """The engine inspector's JSON: the same format as trtexec --exportLayerInfo (profiles.py reads it)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    atomic_write_text(out, info)


def build_engines(builds: list[GraphBuild], bundle_root: str | Path, target: Target, device: DeviceInfo,
                  out_dir: str | Path, log: Log = print) -> Path:
    """Build every engine of the plan here and record the plan as `build.json` (builder: tensorrt-python)."""
    metas = []
    for b in builds:
        log(f"==> {b.component}: {b.onnx} -> {b.engine} ({len(b.profiles)} profile(s), {b.precision})")
        meta = build_engine(b, bundle_root, target, device, log)
        log(f"    wrote {b.engine} ({meta['bytes']} bytes, {meta['build_seconds']} s)")
        metas.append(meta)
    record = {"format": BUILD_FORMAT, "builder": "tensorrt-python", "target": target.name,
              "display_name": target.display_name, "kind": target.kind, "sm": target.sm,
              "tensorrt": device.tensorrt_version, "gpu": device.gpu, "builds": [b.to_dict() for b in builds],
              "engines": metas}
    path = Path(out_dir) / "build.json"
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path
