"""Weight-only INT8 linears for ONNX Runtime CPU (`MatMulNBits`), for the draft's graphs.

A draft step on a CPU multiplies one row by every weight matrix: the time goes to streaming weights
through the caches, not to arithmetic. Eight-bit weights in blocks of 32 along the input dimension
move a quarter of the bytes, and ONNX Runtime's int8 kernels (accuracy level 4: activations
quantized per block too) run each small linear about 1.5-2.3x faster on x86. The draft only
proposes tokens; the target verifies every one, so the answer is unchanged: only how many drafted
tokens are accepted can move (measured on the demo pair: tau 5.42 -> 5.38).

No calibration data is needed: weight scales come from the weights themselves
(`onnxruntime.quantization.matmul_nbits_quantizer`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dream_export.errors import UsageError

BITS = 8
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 compute


def quantize_linear_weights(src: str | Path, dst: str | Path) -> dict:
    """Write `src` with every constant-weight MatMul as an 8-bit `MatMulNBits` to `dst`; return a summary."""
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise UsageError("8-bit draft weights need the onnx package: pip install 'dream-export[export]' "
                         "(or build with --draft-weights fp32)") from e
    import onnxruntime as ort

    dst = Path(dst)
    # The exporter shares a weight between unrolled steps through Identity nodes, and the quantizer
    # only takes MatMuls fed by an initializer: ONNX Runtime's basic pass folds those away first.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(dst))
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one INFO line per weight otherwise
    try:
        q = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK_SIZE, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL)
        q.process()
    finally:
        quiet.setLevel(level)
    onnx.save(q.model.model, str(dst))
    quantized = sum(n.op_type == "MatMulNBits" for n in q.model.model.graph.node)
    return {"weights": f"int{BITS}", "op": "MatMulNBits", "block_size": BLOCK_SIZE,
            "accuracy_level": ACCURACY_LEVEL, "matmuls": before, "quantized": quantized}
