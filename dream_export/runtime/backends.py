"""Backends run a bundle's graphs. One interface; ONNX Runtime everywhere, TensorRT on the device."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dream_export.errors import MissingBackendError, UsageError
from dream_export.runtime.bundle import Bundle


class Backend:
    """Runs named graphs on numpy feeds; records time per graph for the stats."""

    name = "abstract"

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes_in: dict[str, int] = defaultdict(int)

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self._run(graph, feeds, outputs)
        self.seconds[graph] += time.perf_counter() - t0
        self.calls[graph] += 1
        self.bytes_in[graph] += sum(a.nbytes for a in feeds.values() if not getattr(a, "_resident", False))
        return out

    def _run(self, graph, feeds, outputs):  # pragma: no cover - interface
        raise NotImplementedError

    def reset_stats(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.bytes_in.clear()


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime sessions, one per graph (CPU by default; CUDA/TensorRT providers when installed)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int = 2, providers: list[str] | None = None,
                 graph_files: dict[str, Path] | None = None):
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
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {}
        for name in ("vision", "target", "draft"):
            path = (graph_files or {}).get(name, bundle.graph_path(name))
            self.sessions[name] = ort.InferenceSession(str(path), so, providers=providers)
        self.providers = providers

    def _run(self, graph, feeds, outputs):
        sess = self.sessions[graph]
        names = outputs or [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))


def make_backend(name: str, bundle: Bundle, threads: int = 2) -> Backend:
    """Backend by name: 'onnxruntime' (CPU), 'onnxruntime-cuda', or 'tensorrt'."""
    if name in ("onnxruntime", "ort", "cpu"):
        return OnnxRuntimeBackend(bundle, threads)
    if name == "onnxruntime-cuda":
        return OnnxRuntimeBackend(bundle, threads, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if name == "tensorrt":
        raise MissingBackendError(
            "the native TensorRT backend needs `tensorrt` and engines built by `dream-export build` on this GPU; "
            "neither is available here (use --backend onnxruntime)")
    raise UsageError(f"unknown backend {name!r}: onnxruntime, onnxruntime-cuda or tensorrt")
