"""Activation ranges of one graph from recorded feeds, with onnxruntime's calibrators.

The ranges are computed once per graph for every float tensor and then drive both outputs of
`calibrate`: the Q/DQ graph (`quantize_static` reads them back from ORT's own JSON cache format)
and the TensorRT calibration cache (`trt_cache`), so the two agree by construction.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from dream_export.errors import UsageError

METHODS = ("minmax", "entropy", "percentile")
# Feeds per calibrator pass (MinMax). Histogram calibrators get one feed per pass: they stack a pass's
# arrays with np.asarray, which fails on the varying token counts of real feeds.
CHUNK = 16
# Magnitudes at or above this are mask fill values (finfo.min/-inf stand-ins), not activations.
MASK_FILL = 1e30


def ort_method(method: str):
    """`CalibrationMethod` for a CLI method name."""
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if method not in table:
        raise UsageError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    return table[method]


class FeedReader:
    """`CalibrationDataReader` over recorded feeds, restricted to the inputs the graph still has
    (the exporter prunes inputs a graph never reads)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str]):
        self.feeds, self.names = feeds, set(input_names)
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.feeds):
            return None
        f = self.feeds[self._i]
        self._i += 1
        return {k: v for k, v in f.items() if k in self.names}

    def __len__(self) -> int:
        return len(self.feeds)

    def rewind(self) -> None:
        self._i = 0


def _as_reader(feeds, names):
    # onnxruntime type-checks for its ABC; register lazily so importing this module needs no ORT internals
    from onnxruntime.quantization import CalibrationDataReader

    CalibrationDataReader.register(FeedReader)
    return FeedReader(feeds, names)


def collect_ranges(model_path: str | Path, feeds: list[dict[str, np.ndarray]], method: str, work_dir: str | Path,
                   percentile: float = 99.999):
    """Symmetric ranges of every float tensor of `model_path` over `feeds` (an ORT `TensorsData`)."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import create_calibrator

    if not feeds:
        raise UsageError(f"no calibration feeds were recorded for {Path(model_path).name}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    extra = {"symmetric": True}  # TensorRT INT8 is symmetric: one amax per tensor
    if method == "percentile":
        extra["percentile"] = percentile
    calibrator = create_calibrator(Path(model_path), None, augmented_model_path=str(work_dir / "augmented.onnx"),
                                   calibrate_method=ort_method(method), extra_options=extra)
    # the calibrator's own session uses every core; the shared build hosts this runs on have few
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tapped tensor
    so.intra_op_num_threads = 1
    calibrator.infer_session = ort.InferenceSession(str(work_dir / "augmented.onnx"), so,
                                                    providers=["CPUExecutionProvider"])
    names = [i.name for i in calibrator.infer_session.get_inputs()]
    chunk = CHUNK if method == "minmax" else 1
    quiet = contextlib.redirect_stdout(io.StringIO())  # the histogram calibrators print per pass
    if method != "minmax":
        # Masked attention scores hold the mask fill value (float32 max): no histogram spans that range.
        # Such tensors are never quantized; find them with a MinMax pass over two feeds and skip them.
        probe = collect_ranges(model_path, [feeds[0], feeds[-1]], "minmax", work_dir / "probe")
        fill = {n for n, a in amax_table(probe).items() if not np.isfinite(a) or a >= MASK_FILL}
        calibrator.tensors_to_calibrate = set(calibrator.tensors_to_calibrate) - fill
    for start in range(0, len(feeds), chunk):
        # each pass folds its tensors into the running min/max or histograms and drops them
        with quiet:
            calibrator.collect_data(_as_reader(feeds[start:start + chunk], names))
    with contextlib.redirect_stdout(io.StringIO()):
        return calibrator.compute_data()


def amax_table(tensors_data) -> dict[str, float]:
    """tensor name → max |value| the calibrator settled on (the symmetric range)."""
    out = {}
    for name, td in tensors_data.items():
        lo, hi = td.range_value
        out[name] = float(max(abs(float(np.max(lo))), abs(float(np.max(hi)))))
    return out
