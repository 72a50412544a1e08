"""Measured counterparts of the latency model on this host: its peak rates, and the bundle's graph calls
timed with ONNX Runtime at the shapes the model predicts for.

The host has no datasheet entry, so `host_peaks` measures the two roofline rates with numpy (a large
copy for bandwidth, an fp32 GEMM for compute): the model then predicts from this machine's own
ceilings and the comparison with `measure_calls` isolates what the roofline leaves out (ONNX Runtime's
per-node cost, cache effects, non-GEMM work).
"""

from __future__ import annotations

import os
import time

import numpy as np

from dream_export.core.graph_spec import input_shapes
from dream_export.targets.bundle_builds import draft_symbols, target_symbols
from dream_export.targets.latency import CALL_US, LAUNCH_US, Call, Peaks

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def _best_seconds(fn, reps: int) -> float:
    fn()  # warm-up: page faults, thread pools, lazy allocations
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def host_peaks(threads: int = 2, mib: int = 64, n: int = 768, reps: int = 5) -> Peaks:
    """Bandwidth (a `mib`-MiB copy: read + write) and fp32 GEMM rate (n×n×n) of this host, best of `reps`.

    numpy's BLAS picks its own thread count; ONNX Runtime runs `threads`, so this is the host's
    ceiling rather than the session's: the model stays a lower bound on latency.
    """
    a = np.ones(mib * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    copy_s = _best_seconds(lambda: np.copyto(b, a), reps)
    m = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    gemm_s = _best_seconds(lambda: m @ m, reps)
    bw = 2 * a.nbytes / copy_s / 1e9
    tflops = 2 * n**3 / gemm_s / 1e12
    return Peaks(bw, tflops, tflops, CALL_US["cpu"], LAUNCH_US["cpu"], "onnxruntime",
                 source=f"measured on this host (numpy copy {mib} MiB, fp32 GEMM {n}^3; {os.cpu_count()} CPUs)")


def call_feeds(manifest: dict, call: Call) -> dict[str, np.ndarray]:
    """Inputs for `call` shaped from the manifest (masks all-visible, zero embeddings and caches)."""
    entry = manifest["graphs"][call.graph]
    if call.graph == "target":
        sym = target_symbols(manifest, call.tokens, call.rows)
    elif call.graph == "draft":
        sym = draft_symbols(manifest, call.tokens, call.feats)
    else:
        sym = {}
    dtypes = {io["name"]: io["dtype"] for io in entry["inputs"]}
    feeds = {}
    for name, shape in input_shapes(entry, sym).items():
        dt = _NP_DTYPES[dtypes[name]]
        if name == entry.get("bindings", {}).get("logit_rows", "logit_rows") and call.graph == "target":
            feeds[name] = np.arange(shape[0], dtype=dt)
        elif dt is np.bool_:
            feeds[name] = np.ones(shape, dt)
        else:
            feeds[name] = np.zeros(shape, dt)
    return feeds


def measure_calls(backend, manifest: dict, calls: list[Call], reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` wall seconds of each call through `backend.run` (label -> seconds)."""
    out = {}
    for c in calls:
        feeds = call_feeds(manifest, c)
        out[c.label] = _best_seconds(lambda c=c, feeds=feeds: backend.run(c.graph, feeds), reps)
    return out
