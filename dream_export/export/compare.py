"""Numeric comparison of a graph's output with its reference, through polygraphy's comparator.

Every parity figure of the project (export `check` against torch, against the Hugging Face forward, FP16
variants against FP32) is the worst absolute error relative to the reference's scale (its largest
magnitude), so one tolerance reads the same for logits, hidden states and KV rows.
"""

from __future__ import annotations

import numpy as np


def scaled_error(actual: np.ndarray, reference: np.ndarray, tol: float, name: str = "output") -> dict:
    """{"max_abs", "scale", "rel", "ok"}: polygraphy's `SimpleCompareFunc` with atol = `tol` × scale.

    `rel` is the max absolute error over the scale; a non-finite value in `actual` gives `rel` = inf.
    """
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual).astype(np.float64).reshape(reference.shape)
    if not reference.size:
        return {"max_abs": 0.0, "scale": 0.0, "rel": 0.0, "ok": True}
    scale = float(np.max(np.abs(reference)))
    compare = SimpleCompareFunc(check_error_stat="max", atol=tol * max(scale, 1e-12), rtol=0.0)
    # the report carries the figures (no per-output log lines); NaNs only fail the comparison
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(invalid="ignore"):
        result = compare(IterationResult({name: actual}, runner_name="actual"),
                         IterationResult({name: reference}, runner_name="reference"))[name]
    max_abs = float(result.max_absdiff)
    finite = bool(np.all(np.isfinite(actual)))
    rel = max_abs / max(scale, 1e-12) if finite else float("inf")
    return {"max_abs": max_abs if finite else float("inf"), "scale": scale, "rel": rel, "ok": bool(result) and finite}
