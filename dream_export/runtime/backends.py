"""Backends run a bundle's graphs. One interface; ONNX Runtime everywhere, TensorRT on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dream_export.errors import MissingBackendError, UsageError
from dream_export.runtime.backend_base import Backend, aligned_zeros
from dream_export.runtime.bundle import GRAPHS, Bundle
from dream_export.runtime.ort_device import ResidentBuffers, cache_device

__all__ = ["Backend", "OnnxRuntimeBackend", "aligned_zeros", "graph_threads", "make_backend"]


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime sessions, one per graph (CPU by default; CUDA/TensorRT providers when installed)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int | str | dict[str, int] = 2, providers: list[str] | None = None,
                 precision: str = "fp32", graph_files: dict[str, Path] | None = None,
                 profile_dir: Path | None = None, resident_device: str = "cpu"):
        """resident_device: where registered caches live. "cpu" binds the host buffers (ONNX Runtime copies
        them to a GPU provider on every call); "cuda" (with a CUDA/TensorRT provider first) keeps device
        copies that are uploaded once and must then be written through `write_rows`."""
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - base dependency
            raise MissingBackendError("onnxruntime is not installed: pip install onnxruntime") from e
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise MissingBackendError(f"ONNX Runtime providers {missing} are not available here (have {available}); "
                                      "install onnxruntime-gpu for CUDA/TensorRT")
        per_graph = graph_threads(threads)
        self.sessions = {}
        chain = ["draft_chain"] if bundle.chain_graph_usable(precision) and "draft" not in (graph_files or {}) else []
        for name in (*GRAPHS, *chain):
            so = ort.SessionOptions()
            so.intra_op_num_threads = per_graph.get(name, per_graph["draft"])
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Masked attention scores underflow exp() into denormals, which x86 CPUs compute about 8x slower
            # (softmax over a mostly-masked row: 170 us vs 22 us); flushing them to zero changes no result.
            so.add_session_config_entry("session.set_denormal_as_zero", "1")
            path = (graph_files or {}).get(name) or bundle.graph_path(name, precision)
            if profile_dir is not None:
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(profile_dir) / f"ort-{name}")
            self.sessions[name] = ort.InferenceSession(str(path), so, providers=providers)
        self.providers = providers
        self.graphs = frozenset(self.sessions)
        self._cpu_only = providers == ["CPUExecutionProvider"]
        self._outputs: dict[str, list[str]] = {}
        self.threads = per_graph
        self._ort = ort
        self._bound: dict[tuple[str, str], object] = {}
        self._device_copies = None
        if resident_device != "cpu":
            if cache_device(providers) != resident_device:
                raise UsageError(f"resident caches on {resident_device!r} need a provider that runs there first "
                                 f"(got {providers})")
            self._device_copies = ResidentBuffers(ort, resident_device, providers)

    def end_profiling(self) -> dict[str, Path]:
        """Stop ONNX Runtime's profiler (when enabled) and return each graph's trace file."""
        return {name: Path(s.end_profiling()) for name, s in self.sessions.items()}

    def register_resident(self, graph: str, name: str, array: np.ndarray) -> None:
        super().register_resident(graph, name, array)
        # On the host: an OrtValue over the numpy buffer itself (no copy per call; the engine's in-place
        # row writes are what the next call reads). On a device: a copy uploaded once, kept current by
        # `write_rows`.
        if self._device_copies is not None:
            self._bound[(graph, name)] = self._device_copies.value(array)
        else:
            self._bound[(graph, name)] = self._ort.OrtValue.ortvalue_from_numpy(array)

    def write_rows(self, array: np.ndarray, axis: int, start: int, values: np.ndarray) -> None:
        super().write_rows(array, axis, start, values)
        if self._device_copies is not None:
            self._device_copies.write_rows(array, axis, start, values)

    def _run(self, graph, feeds, outputs):
        sess = self.sessions[graph]
        names = outputs or self._outputs.setdefault(graph, [o.name for o in sess.get_outputs()])
        # On the CPU provider `run` reads numpy buffers in place (no copy, resident caches included), and
        # a fresh IO binding per call costs more than the small graphs' own run; binding pays on devices.
        if self._cpu_only or not self.resident.get(graph):
            return dict(zip(names, sess.run(names, feeds), strict=True))
        binding = sess.io_binding()
        for n, a in feeds.items():
            bound = self._bound.get((graph, n))
            if bound is not None and self.resident[graph][n] is a:
                binding.bind_ortvalue_input(n, bound)
            else:
                binding.bind_cpu_input(n, np.ascontiguousarray(a))
        for n in names:
            binding.bind_output(n)
        sess.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))


def graph_threads(spec: int | str | dict[str, int]) -> dict[str, int]:
    """Intra-op threads per graph from `2`, `"2"`, `"target=2,draft=1"` or a dict (unnamed graphs: 2).

    Graphs differ: the draft's small per-node work does not amortise a second thread's wake-up,
    while the target's wider verify passes do, so a CPU deployment may want different counts.
    """
    if isinstance(spec, dict):
        out = dict(spec)
    elif isinstance(spec, int) or str(spec).strip().isdigit():
        out = {g: int(spec) for g in GRAPHS}
    else:
        out = {}
        for part in str(spec).split(","):
            name, _, n = part.partition("=")
            if name.strip() not in GRAPHS or not n.strip().isdigit():
                raise UsageError(f"bad --threads {spec!r}: a number, or GRAPH=N pairs such as target=2,draft=1 "
                                 f"(graphs: {', '.join(GRAPHS)})")
            out[name.strip()] = int(n)
    if any(n < 1 for n in out.values()):
        raise UsageError(f"bad --threads {spec!r}: thread counts start at 1")
    return {g: out.get(g, 2) for g in GRAPHS}


def make_backend(name: str, bundle: Bundle, threads: int | str | dict[str, int] = 2,
                 precision: str = "fp32") -> Backend:
    """Backend by name: 'onnxruntime' (CPU), 'onnxruntime-cuda', or 'tensorrt'."""
    if name in ("onnxruntime", "ort", "cpu"):
        return OnnxRuntimeBackend(bundle, threads, precision=precision)
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # caches stay on the GPU (uploaded once, committed rows written in place) where CUDA really runs
        device = cache_device(providers) if providers[0] in ort.get_available_providers() else "cpu"
        return OnnxRuntimeBackend(bundle, threads, providers, precision, resident_device=device)
    if name == "tensorrt":
        # imported here: the module is only usable where tensorrt and cuda-python are installed
        from dream_export.runtime.trt_backend import TensorRTBackend

        return TensorRTBackend(bundle)
    raise UsageError(f"unknown backend {name!r}: onnxruntime, onnxruntime-cuda or tensorrt")
