"""TensorRT-readiness of Q/DQ graphs: the project's TensorRT lint plus TensorRT's explicit-quantization rules.

TensorRT's Q/DQ importer (TensorRT 8.x–10.x, INT8) takes: signed INT8 with zero point 0 (symmetric),
positive constant scales, per-tensor activation scales, and per-channel weight scales only along the
output-channel axis (Conv: 0; MatMul [in, out] weights: 1); per-channel axes need opset >= 13.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dream_export.export.trt_lint import lint_graph

_WEIGHT_AXIS = {"Conv": 0, "MatMul": 1, "Gemm": 1}


def qdq_errors(model) -> list[str]:
    """Violations of TensorRT's Q/DQ rules in `model` (an `onnx.ModelProto`), one line each."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    errs = []
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{n.op_type} {n.name or n.output[0]}"
        if n.domain not in ("", "ai.onnx"):
            errs.append(f"{where}: domain {n.domain!r} (TensorRT takes the standard ONNX Q/DQ ops only)")
        scale = consts.get(n.input[1])
        if scale is None:
            errs.append(f"{where}: scale is not a constant")
            continue
        s = numpy_helper.to_array(scale)
        if not np.all(s > 0) or not np.all(np.isfinite(s)):
            errs.append(f"{where}: scales must be positive and finite")
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None:
            if zp.data_type != TensorProto.INT8:
                errs.append(f"{where}: zero point type {TensorProto.DataType.Name(zp.data_type)}; TensorRT needs INT8")
            elif np.any(numpy_helper.to_array(zp) != 0):
                errs.append(f"{where}: non-zero zero point; TensorRT quantization is symmetric")
        if s.size > 1:
            if opset < 13:
                errs.append(f"{where}: per-channel scales need opset >= 13 (graph has {opset})")
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if n.op_type == "QuantizeLinear" or n.input[0] not in consts:
                errs.append(f"{where}: per-channel scales on an activation (TensorRT: per-tensor only)")
                continue
            rank = len(consts[n.input[0]].dims)
            for c in consumers.get(n.output[0], []):
                want = _WEIGHT_AXIS.get(c.op_type)
                if want is not None and axis % rank != want:
                    errs.append(f"{where}: per-channel axis {axis} feeding {c.op_type}; TensorRT needs the "
                                f"output-channel axis {want}")
    return errs


def lint_qdq(path: str | Path, min_trt: str = "8.5") -> dict:
    """The TensorRT lint of `path` with the Q/DQ rules added to its errors; JSON-able."""
    import onnx

    rep = lint_graph(path, min_trt).to_dict()
    extra = qdq_errors(onnx.load(str(path), load_external_data=False))
    rep["errors"] = list(rep["errors"]) + [{"op": "Q/DQ", "node": "", "message": e} for e in extra]
    rep["ok"] = not rep["errors"]
    return rep
