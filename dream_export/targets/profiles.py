"""Per-layer profiles from trtexec and from ONNX Runtime, read into one table shape.

Both sources become a list of rows `{name, op_type, time_ms, share, precision}`, sorted by time:
`time_ms` is the mean time per inference run, `share` the fraction of the profile's total, `precision`
the layer's compute type when the source tells it (else None). So a Jetson engine profile and a CPU
ONNX Runtime profile of the same graph print and compare the same way.

Formats (as the tools write them):
- trtexec `--exportProfile=F` (samples/common/sampleReporting.cpp, Profiler::exportJSONProfile):
  `[{"count": N}, {"name": ..., "timeMs": total, "averageMs": ..., "medianMs": ..., "percentage": ...}, ...]`.
  Layer names are written without JSON escaping, so a name with a quote breaks strict JSON; we fall
  back to reading the one-object-per-line layout.
- trtexec `--exportLayerInfo=F` with `--profilingVerbosity=detailed`: `{"Layers": [{"Name",
  "LayerType", "ParameterType"?, "Inputs": [{"Name", "Dimensions", "Format/Datatype"}], "Outputs": [...]}],
  "Bindings": [...]}`; without detailed verbosity "Layers" is a list of names only. As in NVIDIA's
  trt-engine-explorer, a layer's precision is its first input's data type.
- ONNX Runtime `SessionOptions.enable_profiling`: a Chrome-trace list of events; per node per run one
  `{"cat": "Node", "name": "<node>_kernel_time", "dur": µs, "args": {"op_name", "provider",
  "input_type_shape": [{"float": [..]}], ...}}`, and one `{"cat": "Session", "name": "model_run"}` per run.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from dream_export.errors import UsageError

ROW_KEYS: tuple[str, ...] = ("name", "op_type", "time_ms", "share", "precision")

# ONNX Runtime type names (input_type_shape keys) -> our precision words.
_ORT_TYPES = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16", "double": "fp64", "int8": "int8",
              "uint8": "int8", "float8e4m3fn": "fp8", "float8e5m2": "fp8", "int32": "int32", "int64": "int64",
              "bool": "bool"}
# TensorRT "Format/Datatype" strings name the type as one of these words ("Row major linear FP16 format",
# "Channel major Int8 format where channel % 4 == 0", kgen-style "Half"); order matters (BFloat16 ⊃ Float).
_TRT_TYPES = (("BFloat16", "bf16"), ("FP8", "fp8"), ("FP16", "fp16"), ("Half", "fp16"), ("FP32", "fp32"),
              ("Float", "fp32"), ("Int8", "int8"), ("INT8", "int8"), ("UInt8", "int8"), ("Int32", "int32"),
              ("INT32", "int32"), ("Int64", "int64"), ("BOOL", "bool"), ("Bool", "bool"))


def _load(source: str | Path | Any) -> Any:
    """A path to JSON, a JSON string, or already-parsed data."""
    if isinstance(source, (list, dict)):
        return source
    is_text = isinstance(source, str) and source.lstrip()[:1] in ("[", "{")
    try:
        text = source if is_text else Path(source).read_text()
    except OSError as e:
        raise UsageError(f"cannot read profile {source}: {e.strerror or e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _LenientText(text)


class _LenientText(str):
    """Marker: the text was not strict JSON (trtexec's unescaped layer names)."""


def _rows(times: dict[str, float], op_types: dict[str, str | None], precisions: dict[str, str | None]) -> list[dict]:
    total = sum(times.values())
    rows = [{"name": name, "op_type": op_types.get(name), "time_ms": t,
             "share": (t / total) if total > 0 else 0.0, "precision": precisions.get(name)}
            for name, t in times.items()]
    rows.sort(key=lambda r: (-r["time_ms"], r["name"]))
    return rows


# ------------------------------------------------------------------------------------ trtexec


_LINE = re.compile(r'"name"\s*:\s*"(?P<name>.*)"\s*,\s*"timeMs"\s*:\s*(?P<total>[-+0-9.eE]+)'
                   r'(?:\s*,\s*"averageMs"\s*:\s*(?P<avg>[-+0-9.eE]+))?')
_COUNT = re.compile(r'"count"\s*:\s*(\d+)')


def parse_trtexec_profile(profile: str | Path | list, layer_info: str | Path | dict | None = None) -> list[dict]:
    """Rows from a trtexec `--exportProfile` JSON; `layer_info` (an `--exportLayerInfo` JSON) adds types.

    `time_ms` is trtexec's `averageMs` (total / count when absent). Names keep trtexec's spelling,
    including the " [profile N]" suffix of layers in secondary optimization profiles.
    """
    data = _load(profile)
    times: dict[str, float] = {}
    if isinstance(data, _LenientText):
        m = _COUNT.search(data)
        count = int(m.group(1)) if m else 1
        for line in data.splitlines():
            hit = _LINE.search(line)
            if hit:
                avg = hit.group("avg")
                times[hit.group("name")] = float(avg) if avg else float(hit.group("total")) / max(count, 1)
    elif isinstance(data, list):
        count = next((int(e["count"]) for e in data if isinstance(e, dict) and "count" in e), 1)
        for e in data:
            if not isinstance(e, dict) or "name" not in e:
                continue
            avg = e.get("averageMs")
            times[str(e["name"])] = float(avg) if avg is not None else float(e.get("timeMs", 0.0)) / max(count, 1)
    else:
        raise UsageError("not a trtexec --exportProfile file: expected a JSON list starting with {\"count\": N}")
    if not times:
        raise UsageError("the trtexec profile has no layers (was the engine run with --exportProfile?)")
    op_types, precisions = parse_trtexec_layer_info(layer_info) if layer_info is not None else ({}, {})
    return _rows(times, op_types, precisions)


def parse_trtexec_layer_info(layer_info: str | Path | dict) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """(name -> layer type, name -> precision) from an `--exportLayerInfo` JSON.

    Raises `UsageError` when the file holds names only (engine built without detailed verbosity).
    """
    data = _load(layer_info)
    layers = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise UsageError("not a trtexec --exportLayerInfo file: no \"Layers\" list")
    if layers and not isinstance(layers[0], dict):
        raise UsageError("the layer info has names only; build the engine with --profilingVerbosity=detailed "
                         "to get layer types and precisions")
    op_types: dict[str, str | None] = {}
    precisions: dict[str, str | None] = {}
    for layer in layers:
        name = layer.get("Name")
        if name is None:
            continue
        op_types[name] = layer.get("ParameterType") or layer.get("LayerType")
        tensors = (layer.get("Inputs") or []) + (layer.get("Outputs") or [])
        precisions[name] = next((p for p in (_trt_precision(t.get("Format/Datatype", "")) for t in tensors) if p),
                                None)
    return op_types, precisions


def _trt_precision(fmt: str) -> str | None:
    for word, precision in _TRT_TYPES:
        if re.search(rf"\b{word}\b", fmt):
            return precision
    return None


# ------------------------------------------------------------------------------------ ONNX Runtime


def parse_ort_profile(profile: str | Path | list) -> list[dict]:
    """Rows from an ONNX Runtime profiler JSON (`SessionOptions.enable_profiling = True`).

    `time_ms` is the node's kernel time summed over the file and divided by the number of runs
    (`model_run` events), so it is a mean per inference like trtexec's `averageMs`. Fence events are
    ignored; `precision` is the node's first input type.
    """
    data = _load(profile)
    if not isinstance(data, list):
        raise UsageError("not an ONNX Runtime profile: expected a JSON list of trace events")
    runs = sum(1 for e in data if isinstance(e, dict) and e.get("cat") == "Session" and e.get("name") == "model_run")
    totals_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    op_types: dict[str, str | None] = {}
    precisions: dict[str, str | None] = {}
    for e in data:
        if not isinstance(e, dict) or e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        args = e.get("args") or {}
        totals_us[name] += float(e.get("dur", 0))
        calls[name] += 1
        op_types.setdefault(name, args.get("op_name"))
        if name not in precisions:
            shapes = args.get("input_type_shape") or args.get("output_type_shape") or []
            dtype = next(iter(shapes[0]), None) if shapes and isinstance(shapes[0], dict) else None
            precisions[name] = _ORT_TYPES.get(dtype, dtype) if dtype else None
    if not totals_us:
        raise UsageError("the ONNX Runtime profile has no node events (was enable_profiling set before the runs?)")
    # Without model_run events (a trimmed file) a node's call count is the best run count we have.
    n_runs = runs or max(calls.values())
    times = {name: us / 1000.0 / n_runs for name, us in totals_us.items()}
    return _rows(times, op_types, precisions)


# ------------------------------------------------------------------------------------ both


def load_profile(path: str | Path, layer_info: str | Path | None = None) -> list[dict]:
    """Detect the format of `path` (trtexec or ONNX Runtime) and parse it."""
    data = _load(Path(path))
    if isinstance(data, list) and any(isinstance(e, dict) and "cat" in e for e in data[:50]):
        return parse_ort_profile(data)
    return parse_trtexec_profile(data, layer_info)


def format_table(rows: list[dict], top: int = 15) -> str:
    """A fixed-width text table of the `top` slowest rows, with the total and what was left out."""
    if not rows:
        return "(empty profile)"
    total = sum(r["time_ms"] for r in rows)
    shown = rows[:top] if top > 0 else rows
    lines = [f"{'#':>3}  {'time ms':>9}  {'share':>6}  {'cum':>6}  {'prec':<5} {'op':<18} name"]
    cum = 0.0
    for i, r in enumerate(shown, 1):
        cum += r["share"]
        name = r["name"] if len(r["name"]) <= 70 else r["name"][:33] + "…" + r["name"][-36:]
        lines.append(f"{i:>3}  {r['time_ms']:>9.4f}  {r['share']:>6.1%}  {cum:>6.1%}  "
                     f"{r['precision'] or '-':<5} {(r['op_type'] or '-')[:18]:<18} {name}")
    rest = rows[len(shown):]
    if rest:
        rest_ms = sum(r["time_ms"] for r in rest)
        lines.append(f"     … {len(rest)} more layers: {rest_ms:.4f} ms ({rest_ms / total if total else 0:.1%})")
    lines.append(f"     total {total:.4f} ms per run over {len(rows)} layers")
    return "\n".join(lines)
