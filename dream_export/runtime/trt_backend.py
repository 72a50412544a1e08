"""Native TensorRT backend: the bundle's engines run through TensorRT's tensor-address API (no torch).

Each engine is checked against the running device (`engine_meta.check_engine`) before it is
deserialized. Every optimization profile gets its own execution context, selected per call by the
input shapes (`choose_profile`), so the target's prefill and verify profiles never need a profile
switch on the stream. Calls bind device addresses with `set_tensor_address` and run with
`execute_async_v3` on one CUDA stream (cuda-python's runtime binding).

Runtime-owned caches (`register_resident`) are page-locked in place with `cudaHostRegister(...,
Mapped)` and bound by their mapped device pointer: the engine's in-place row writes on the host are
what the next call reads, with no per-call copy. On Jetson (one memory for CPU and GPU) that is the
native path. On a discrete GPU the engine then reads the cache across PCIe on every call; a
device-resident cache needs the engine to commit rows through the backend, which it does not yet do.
A cache whose dtype differs from the engine's input (a float32 buffer for an fp16 engine) is cast
and copied per call instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dream_export.errors import IncompatibleArtifactError, MissingBackendError, UsageError
from dream_export.runtime.backends import Backend
from dream_export.runtime.bundle import GRAPHS, Bundle
from dream_export.runtime.engine_meta import (
    DeviceInfo,
    check_engine,
    load_cudart,
    mismatch_reasons,
    probe_device,
    read_metadata,
)

Range = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # input -> (min shape, max shape)


def choose_profile(ranges: list[Range], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the optimization profile that accepts `shapes`: among those whose [min, max] hold every
    input, the one with the smallest maxima (the tightest profile is the one tuned for such calls: a
    one-token decode goes to the verify profile, not the prefill one). `UsageError` when none does."""
    best, best_volume = -1, None
    for i, rng in enumerate(ranges):
        ok = all(name in shapes and len(shapes[name]) == len(mn)
                 and all(a <= d <= b for a, d, b in zip(mn, shapes[name], mx, strict=True))
                 for name, (mn, mx) in rng.items())
        if ok:
            volume = sum(int(np.prod(mx)) for _, mx in rng.values())
            if best_volume is None or volume < best_volume:
                best, best_volume = i, volume
    if best < 0:
        spans = "; ".join(", ".join(f"{n} {list(mn)}..{list(mx)}" for n, (mn, mx) in r.items() if mn != mx)
                          for r in ranges)
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise UsageError(f"input shapes ({got}) fit no optimization profile of the engine ({spans}); rebuild the "
                         "engines with a larger --max-prompt or re-export with a larger --max-tree")
    return best


def find_engine_dir(bundle_root: Path, device: DeviceInfo) -> Path:
    """The `engines/<target>/` directory whose engines were built for `device` (first match by name).

    Raises `IncompatibleArtifactError` listing, per directory, why it does not fit.
    """
    root = Path(bundle_root) / "engines"
    tried: list[str] = []
    for d in sorted(p for p in root.glob("*") if p.is_dir() and p.name != "cpu"):
        if not all((d / f"{g}.engine").exists() for g in GRAPHS):
            tried.append(f"{d.name}: engines missing (run its build.sh on the device)")
            continue
        try:
            reasons = [r for g in GRAPHS for r in mismatch_reasons(read_metadata(d / f"{g}.engine"), device, g)]
        except IncompatibleArtifactError as e:
            reasons = [str(e)]
        if not reasons:
            return d
        tried.append(f"{d.name}: {reasons[0]}")
    detail = "; ".join(tried) if tried else "the bundle has no engines/<target>/ directory"
    raise IncompatibleArtifactError(f"no engines in {root} fit this device (TensorRT {device.tensorrt_version}, "
                                    f"SM {device.sm}): {detail}. Build them here with `dream-export build "
                                    f"{bundle_root} --target <this device>`")


@dataclass
class _Engine:
    """One deserialized engine with an execution context per optimization profile."""

    engine: object
    contexts: list
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    ranges: list[Range]
    device_buffers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (pointer, bytes)


class TensorRTBackend(Backend):
    """Runs `engines/<target>/{vision,target,draft}.engine` of a bundle on the local GPU."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, engine_dir: str | Path | None = None):
        super().__init__()
        try:
            import tensorrt as trt
        except ImportError as e:
            raise MissingBackendError("the TensorRT backend needs `tensorrt` (JetPack's python3-libnvinfer, or pip "
                                      "install 'dream-export[trt]'); use --backend onnxruntime here") from e
        self._trt = trt
        self._cudart = load_cudart()
        self.device = probe_device()
        self.engine_dir = Path(engine_dir) if engine_dir else find_engine_dir(bundle.root, self.device)
        self.stream = self._call(self._cudart.cudaStreamCreate())
        self._handle = int(self.stream)  # TensorRT takes the raw cudaStream_t as an integer
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines: dict[str, _Engine] = {}
        self.meta: dict[str, dict] = {}
        self._mapped: dict[tuple[str, str], int] = {}  # (graph, input) -> device pointer of a registered buffer
        for g in GRAPHS:
            path = self.engine_dir / f"{g}.engine"
            self.meta[g] = check_engine(path, self.device, g)
            self.engines[g] = self._load(path)

    # ---- setup -----------------------------------------------------------------------------------
    def _call(self, result):
        """cuda-python returns (error, *values): raise on error, return the value(s)."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {err}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def _load(self, path: Path) -> _Engine:
        trt = self._trt
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise IncompatibleArtifactError(f"TensorRT could not deserialize {path} (see the log above); rebuild it")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        ranges: list[Range] = []
        contexts = []
        for p in range(engine.num_optimization_profiles):
            ranges.append({n: (tuple(engine.get_tensor_profile_shape(n, p)[0]),
                               tuple(engine.get_tensor_profile_shape(n, p)[2])) for n in inputs})
            ctx = engine.create_execution_context()
            ctx.set_optimization_profile_async(p, self._handle)
            contexts.append(ctx)
        self._call(self._cudart.cudaStreamSynchronize(self.stream))
        return _Engine(engine, contexts, inputs, outputs, dtypes, ranges)

    def register_resident(self, graph: str, name: str, array: np.ndarray) -> None:
        old = self.resident.get(graph, {}).get(name)
        if (graph, name) in self._mapped and old is not None:  # a new engine replaces its caches
            self._cudart.cudaHostUnregister(old.ctypes.data)
            del self._mapped[(graph, name)]
        super().register_resident(graph, name, array)
        eng = self.engines.get(graph)
        if eng is None or name not in eng.dtypes or array.dtype != eng.dtypes[name] or not array.flags.c_contiguous:
            return  # cast + copied per call
        cudart = self._cudart
        ptr = array.ctypes.data
        self._call(cudart.cudaHostRegister(ptr, array.nbytes, cudart.cudaHostRegisterMapped))
        self._mapped[(graph, name)] = int(self._call(cudart.cudaHostGetDevicePointer(ptr, 0)))

    # ---- calls -----------------------------------------------------------------------------------
    def _device_buffer(self, eng: _Engine, key: str, nbytes: int) -> int:
        """A device buffer of at least `nbytes` for `key`, grown (never shrunk) across calls."""
        ptr, size = eng.device_buffers.get(key, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                self._call(self._cudart.cudaFree(ptr))
            size = max(nbytes, 256)
            ptr = int(self._call(self._cudart.cudaMalloc(size)))
            eng.device_buffers[key] = (ptr, size)
        return ptr

    def _run(self, graph, feeds, outputs):
        eng = self.engines[graph]
        cudart = self._cudart
        missing = [n for n in eng.inputs if n not in feeds]
        if missing:
            raise UsageError(f"{graph} engine needs inputs {missing} that the runtime did not pass")
        ctx = eng.contexts[choose_profile(eng.ranges, {n: tuple(feeds[n].shape) for n in eng.inputs})]
        keep = []  # host arrays must outlive the async copies queued from them
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for n in eng.inputs:
            src = feeds[n]
            ctx.set_input_shape(n, tuple(src.shape))
            mapped = self._mapped.get((graph, n))
            if mapped is not None and self.resident.get(graph, {}).get(n) is src:
                ctx.set_tensor_address(n, mapped)
                continue
            arr = np.ascontiguousarray(src, dtype=eng.dtypes[n])
            keep.append(arr)
            dev = self._device_buffer(eng, n, arr.nbytes)
            if arr.nbytes:
                self._call(cudart.cudaMemcpyAsync(dev, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            ctx.set_tensor_address(n, dev)
        wanted = outputs or eng.outputs
        host: dict[str, np.ndarray] = {}
        for n in eng.outputs:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise IncompatibleArtifactError(f"{graph} engine output {n} has a data-dependent shape {shape}; "
                                                "the exported graphs never do: rebuild from this bundle's ONNX")
            out = np.empty(shape, eng.dtypes[n])
            ctx.set_tensor_address(n, self._device_buffer(eng, n, out.nbytes))
            if n in wanted:
                host[n] = out
        if not ctx.execute_async_v3(self._handle):
            raise RuntimeError(f"TensorRT failed to enqueue the {graph} engine (see the TensorRT log)")
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, out in host.items():
            if out.nbytes:
                self._call(cudart.cudaMemcpyAsync(out.ctypes.data, eng.device_buffers[n][0], out.nbytes, d2h,
                                                  self.stream))
        self._call(cudart.cudaStreamSynchronize(self.stream))
        del keep
        return {n: host[n] for n in wanted}

    def close(self) -> None:
        """Free device buffers and unregister the page-locked caches (also done at interpreter exit)."""
        cudart = self._cudart
        for eng in self.engines.values():
            for ptr, _ in eng.device_buffers.values():
                cudart.cudaFree(ptr)
            eng.device_buffers.clear()
        for (graph, name) in list(self._mapped):
            cudart.cudaHostUnregister(self.resident[graph][name].ctypes.data)
        self._mapped.clear()
