"""INT8 Q/DQ graphs with `onnxruntime.quantization.quantize_static` (explicit quantization).

Settings, for what TensorRT's Q/DQ path accepts: QDQ format, signed INT8 with zero point 0
(`ActivationSymmetric`, `WeightSymmetric`), per-channel weights on the output-channel axis,
per-tensor activations, Q/DQ on the linears' inputs only (outputs, in particular the new KV rows,
stay float). Only the nodes `select` picks are quantized; graph inputs and outputs keep
their dtypes, so the runtime feeds a Q/DQ graph like the fp32 graph it came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dream_export.calib.ranges import amax_table, collect_ranges, ort_method
from dream_export.calib.select import LINEAR_OPS, Selection


@dataclass
class QuantResult:
    """What quantizing one graph produced: the activation ranges of the fp32 graph, the plan, notes."""

    amax: dict[str, float]
    selection: Selection
    smoothquant: dict | None = None
    info: dict = field(default_factory=dict)


def quantize_graph(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]], method: str,
                   selection: Selection, work_dir: str | Path, smooth_alpha: float | None = None) -> QuantResult:
    """Calibrate `src` on `feeds` and write its Q/DQ INT8 version to `dst`.

    The ranges of the fp32 graph are returned (they feed the TensorRT cache). With SmoothQuant the
    smoothed graph is calibrated again for its own Q/DQ scales, since smoothing changes the
    quantized activations.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ranges = collect_ranges(src, feeds, method, work / "fp32")
    result = QuantResult(amax_table(ranges), selection)
    qsrc, qranges = Path(src), ranges
    if smooth_alpha is not None:
        from dream_export.calib.smoothquant import smooth

        model, info = smooth(onnx.load(str(src)), selection.quantize, feeds, smooth_alpha)
        qsrc = work / "smoothed.onnx"
        onnx.save(model, str(qsrc))
        result.smoothquant = info
        qranges = collect_ranges(qsrc, feeds, method, work / "smoothed")
    cache = work / "ranges.json"
    save_tensors_data(qranges, cache)  # ORT's own range cache: quantize_static reads it instead of recalibrating
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # quantize_static logs a generic "consider pre-processing" warning: that pass (shape inference +
    # graph optimization) would rename tensors and break the range cache, so it is skipped on purpose
    logging.disable(logging.WARNING)
    try:
        quantize_static(
            str(qsrc), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(LINEAR_OPS), per_channel=True, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, nodes_to_quantize=selection.quantize or ["<none>"],
            calibrate_method=ort_method(method), calibration_cache_path=str(cache),
            # Q/DQ on the linears' inputs only: their outputs feed the KV cache, residual adds and norms,
            # which stay float (TensorRT fuses input-side Q/DQ into the INT8 GEMM).
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": list(LINEAR_OPS)},
        )
    finally:
        logging.disable(logging.NOTSET)
    q = onnx.load(str(dst), load_external_data=False)
    ops = [n.op_type for n in q.graph.node]
    result.info = {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear")}
    return result


# Q/DQ ops take FP16 scales (and so give FP16 outputs) from opset 19 on.
_FP16_QDQ_OPSET = 19


def fp16_qdq(src: str | Path, dst: str | Path, work_dir: str | Path) -> dict:
    """Write an FP16 twin of the Q/DQ graph `src` to `dst`: the Q/DQ scales become FP16 (so each DQ feeds
    its INT8 linear an FP16 tensor) and every op the calibration did not quantize runs in FP16, except
    what `export/fp16.py` keeps FP32 (norm statistics, softmax, rotary angles, gates). For TensorRT's
    strongly typed builds, which take every type from the graph: from the fp32 Q/DQ graph, the LM head,
    attention products and the rest would run in FP32. Graph inputs and outputs keep their dtypes.
    Returns what stayed FP32 (counts by reason)."""
    import onnx
    from onnx import version_converter

    from dream_export.export.fp16 import convert_graph

    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _FP16_QDQ_OPSET:
        model = version_converter.convert_version(model, _FP16_QDQ_OPSET)
    tmp = Path(work_dir) / "qdq_opset19.onnx"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(tmp), save_as_external_data=True, location=tmp.name + ".data")
    return convert_graph(tmp, dst)
