"""Calibration and quantization of a bundle: `dream-export calibrate` and `dream-export calib-report`.

One job per module:

* `capture`     — run the bundle's own runtime over calibration prompts and record every graph's feeds;
* `ranges`      — activation ranges from those feeds (onnxruntime's calibrators: MinMax/Entropy/Percentile);
* `select`      — which nodes are quantized and which stay in higher precision, and why;
* `smoothquant` — optional SmoothQuant scaling of the linears' activation/weight channels;
* `quantize`    — INT8 Q/DQ graphs through `onnxruntime.quantization.quantize_static`;
* `trt_cache`   — TensorRT's text calibration cache (implicit INT8, TensorRT 8.x) and its parser;
* `qdq_lint`    — TensorRT's Q/DQ rules on top of the TensorRT-readiness lint;
* `bundle`      — a new bundle directory (INT8 or FP16) that the normal runtime loads unchanged;
* `report`      — τ, greedy agreement with fp32 and demo accuracy per precision (`reports/calib.json`);
* `command`     — the click commands.
"""
