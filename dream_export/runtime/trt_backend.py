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
device-resident cache would keep a device copy written through `Backend.write_rows` (as the ONNX
Runtime backend does for CUDA), which this backend does not yet do.

TensorRT requires every bound address to be 256-byte aligned (`setTensorAddress`,
include/NvInferRuntime.h); the mapping keeps a buffer's offset within its page, so only buffers
allocated aligned (`backend_base.aligned_zeros`) are bound in place, others are copied per call with a
warning. Which address each input gets is decided by pure functions (`map_resident`,
`input_addresses`) that tests replay on recorded runtime calls; `set_input_shape` and
`set_tensor_address` results are checked.
A cache whose dtype differs from the engine's input (a float32 buffer for an fp16 engine) is cast
and copied per call instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dream_export.errors import IncompatibleArtifactError, MissingBackendError, UsageError
from dream_export.runtime.backend_base import BIND_ALIGNMENT, Backend
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


def profile_fits(rng: Range, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether every input of the profile `rng` is in `shapes` with each dimension within [min, max]."""
    return all(name in shapes and len(shapes[name]) == len(mn)
               and all(a <= d <= b for a, d, b in zip(mn, shapes[name], mx, strict=True))
               for name, (mn, mx) in rng.items())


def choose_profile(ranges: list[Range], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the optimization profile that accepts `shapes`: among those whose [min, max] hold every
    input, the one with the smallest maxima (the tightest profile is the one tuned for such calls: a
    one-token decode goes to the verify profile, not the prefill one). `UsageError` when none does."""
    best, best_volume = -1, None
    for i, rng in enumerate(ranges):
        if profile_fits(rng, shapes):
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


Buffer = tuple[int, int]  # (data pointer, bytes) of a C-contiguous array in the engine's dtype


def map_resident(array: np.ndarray, engine_dtype: np.dtype, register: Callable[[int, int], int]) -> int | None:
    """Bind a runtime-owned buffer in place: `register(pointer, bytes)` page-locks and maps it and returns
    its device address, which is returned for `set_tensor_address`. None when it cannot be bound in
    place and is copied per call instead: its dtype differs from the engine's (cast per call), it is not
    C-contiguous, or it is not `BIND_ALIGNMENT`-aligned (TensorRT refuses such addresses; the mapping
    keeps the offset within the page, so the host address decides)."""
    if array.dtype != engine_dtype or not array.flags.c_contiguous:
        return None
    if array.ctypes.data % BIND_ALIGNMENT:
        warnings.warn(f"a runtime cache of {array.nbytes} bytes is not {BIND_ALIGNMENT}-byte aligned (address "
                      f"{array.ctypes.data % BIND_ALIGNMENT} mod {BIND_ALIGNMENT}), which TensorRT requires: it is "
                      "copied to the device on every call; allocate it with runtime.backends.aligned_zeros",
                      stacklevel=3)
        return None
    address = int(register(array.ctypes.data, array.nbytes))
    check_alignment("a mapped runtime cache", address)
    return address


def buffer_of(array: np.ndarray, engine_dtype: np.dtype) -> Buffer | None:
    """(pointer, bytes) of a feed that can be bound as it is (C-contiguous, the engine's dtype), else None."""
    if array.dtype != engine_dtype or not array.flags.c_contiguous:
        return None
    return array.ctypes.data, array.nbytes


def input_addresses(inputs: list[str], feeds: dict[str, Buffer | None],
                    mapped: dict[str, tuple[Buffer, int]]) -> dict[str, int | None]:
    """The address each engine input is bound at: the mapped device address of a registered buffer when
    the call passes exactly that memory (`feeds[name]` equals its (pointer, bytes)); None for inputs
    staged through a device buffer of the backend (cudaMalloc: 256-byte aligned)."""
    out: dict[str, int | None] = {}
    for n in inputs:
        reg = mapped.get(n)
        out[n] = reg[1] if reg is not None and feeds.get(n) == reg[0] else None
    return out


def check_alignment(what: str, address: int) -> None:
    """Refuse an address TensorRT would reject (`setTensorAddress` needs `BIND_ALIGNMENT` bytes)."""
    if address % BIND_ALIGNMENT:
        raise RuntimeError(f"{what} is at address {address:#x}, not {BIND_ALIGNMENT}-byte aligned as TensorRT's "
                           "setTensorAddress requires")


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
        # (graph, input) -> ((host pointer, bytes), device address) of a buffer bound in place
        self._mapped: dict[tuple[str, str], tuple[tuple[int, int], int]] = {}
        self._pinned: dict[int, list[int]] = {}  # host pointer -> [device address, registrations]
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
        old = self._mapped.pop((graph, name), None)
        if old is not None:  # a new engine replaces its caches
            self._unpin(old[0][0])
        super().register_resident(graph, name, array)
        eng = self.engines.get(graph)
        if eng is None or name not in eng.dtypes:
            return
        address = map_resident(array, eng.dtypes[name], self._pin)
        if address is not None:
            self._mapped[(graph, name)] = ((array.ctypes.data, array.nbytes), address)

    def _pin(self, ptr: int, nbytes: int) -> int:
        """Page-lock and map host memory once (a buffer may serve several graphs); its device address."""
        if ptr not in self._pinned:
            cudart = self._cudart
            self._call(cudart.cudaHostRegister(ptr, nbytes, cudart.cudaHostRegisterMapped))
            self._pinned[ptr] = [int(self._call(cudart.cudaHostGetDevicePointer(ptr, 0))), 0]
        self._pinned[ptr][1] += 1
        return self._pinned[ptr][0]

    def _unpin(self, ptr: int) -> None:
        entry = self._pinned.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self._cudart.cudaHostUnregister(ptr)
                del self._pinned[ptr]

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
        mapped = {n: reg for (g, n), reg in self._mapped.items() if g == graph}
        addresses = input_addresses(eng.inputs, {n: buffer_of(feeds[n], eng.dtypes[n]) for n in eng.inputs}, mapped)
        for n in eng.inputs:
            src = feeds[n]
            if not ctx.set_input_shape(n, tuple(src.shape)):
                raise UsageError(f"TensorRT refused shape {list(src.shape)} for input {n} of the {graph} engine "
                                 "(see the TensorRT log)")
            dev = addresses[n]
            if dev is None:  # staged: copied into a device buffer of this backend
                arr = np.ascontiguousarray(src, dtype=eng.dtypes[n])
                keep.append(arr)
                dev = self._device_buffer(eng, n, arr.nbytes)
                if arr.nbytes:
                    self._call(cudart.cudaMemcpyAsync(dev, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self._bind(ctx, graph, n, dev)
        wanted = outputs or eng.outputs
        host: dict[str, np.ndarray] = {}
        for n in eng.outputs:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise IncompatibleArtifactError(f"{graph} engine output {n} has a data-dependent shape {shape}; "
                                                "the exported graphs never do: rebuild from this bundle's ONNX")
            out = np.empty(shape, eng.dtypes[n])
            self._bind(ctx, graph, n, self._device_buffer(eng, n, out.nbytes))
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

    @staticmethod
    def _bind(ctx, graph: str, name: str, address: int) -> None:
        check_alignment(f"{graph} engine tensor {name}", address)
        if not ctx.set_tensor_address(name, address):
            raise RuntimeError(f"TensorRT refused the address of {name} for the {graph} engine (see the TensorRT log)")

    def close(self) -> None:
        """Free device buffers and unregister the page-locked caches (also done at interpreter exit)."""
        cudart = self._cudart
        for eng in self.engines.values():
            for ptr, _ in eng.device_buffers.values():
                cudart.cudaFree(ptr)
            eng.device_buffers.clear()
        for ptr in list(self._pinned):
            cudart.cudaHostUnregister(ptr)
        self._pinned.clear()
        self._mapped.clear()
