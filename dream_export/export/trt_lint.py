"""TensorRT-readiness lint of ONNX graphs: will TensorRT's ONNX parser (8.5 … 10.x) take this graph?

TensorRT cannot run here, so this is a static check against what the parser publishes and enforces:

* the operator support matrix of onnx-tensorrt, ``docs/operators.md``, per release branch
  (see ``SOURCE``); an op must be supported by the *minimum* TensorRT version asked for;
* restrictions the matrix states per op, and a few dtype rules the parser's importers enforce in code
  (``builtin_op_importers.cpp`` / ``onnx2trt_utils.cpp`` on 8.5-GA, ``onnxOpImporters.cpp`` /
  ``importerUtils.cpp`` on 10.1-GA). A restriction applies when any release from the minimum version
  on has it, since a bundle must parse on every TensorRT from the minimum up;
* only the default ONNX domain (custom-domain ops would need plugins, which bundles never use);
* the opset within every supported release's range;
* every dynamic input dimension named, so the build plan's optimization profiles can bound it.

Passing this lint is necessary, not sufficient: only a real TensorRT build proves a graph parses.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dream_export.errors import UsageError
from dream_export.io import atomic_write_text

# ------------------------------------------------------------------------------------------ op table

# Where the table comes from: onnx/onnx-tensorrt, docs/operators.md, one release branch per TensorRT
# version (transcribed from a git mirror of the repository; each branch's head commit and commit date
# below). Restrictions coded in the checks cite the importer sources of the same commits.
# No release branch newer than 10.1-GA was available, so TensorRT 10.2+ and 11 are linted with the
# 10.1 table (reported as a warning).
SOURCE = {
    "repo": "onnx/onnx-tensorrt",
    "file": "docs/operators.md",
    "branches": {
        "8.5": {"branch": "8.5-GA", "commit": "fdeeaca87ad2eef316aafb016e1822502f383eea", "date": "2023-02-01"},
        "8.6": {"branch": "8.6-GA", "commit": "ee0b139bc68567a89618c1d84dcd461cc144aad4", "date": "2024-04-04"},
        "10.0": {"branch": "10.0-GA", "commit": "73f629e04a68765647010b98dd94257282d05d11", "date": "2024-06-18"},
        "10.1": {"branch": "10.1-GA", "commit": "96e781103cfc4adf4a6bb557e94bac8e693f6f4c", "date": "2024-06-17"},
    },
}
VERSIONS = ("8.5", "8.6", "10.0", "10.1")

# Ops marked "Y" in the 8.5-GA matrix ...
_SUPPORTED_8_5 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample HardSigmoid HardSwish
Identity If ImageScaler InstanceNormalization IsNaN LRN LSTM LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# ... and the ops each later matrix adds (no release removed an op).
_ADDED = {
    "8.6": ("GroupNormalization", "IsInf", "LayerNormalization"),
    "10.0": ("CastLike", "Gelu", "Hardmax", "Mish"),
    "10.1": ("DeformConv",),
}

# The opset range each release states (8.x: "up to Opset 17", 10.x: "opset 9 to opset 20"; the 8.x
# lower bound is the parser's own warning threshold in ModelImporter.cpp).
_OPSET = {"8.5": (7, 17), "8.6": (7, 17), "10.0": (9, 20), "10.1": (9, 20)}

# Dtype rules the importers enforce (they reject the node, not just run it slowly). TensorRT 8.x has
# no INT64 tensors: the parser casts INT64 to INT32, so an int64 input counts as INT32 there.
_FLOAT = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"})
# unaryHelper's default branch / activation layers: float only (BOOL, INT32, INT64 rejected).
_FLOAT_ONLY = frozenset("""
Sqrt Exp Log Erf Reciprocal Sin Cos Tan Sinh Cosh Asin Acos Atan Asinh Acosh Atanh Ceil Floor Round
Tanh Sigmoid Softmax LogSoftmax Softplus Softsign Elu Selu HardSigmoid LayerNormalization
""".split())
_BOOL_ONLY = frozenset({"Not", "And", "Or", "Xor"})  # kNOT / elementwiseCheck: BOOL inputs only
_NO_INT = frozenset({"MatMul", "Gemm"})  # notInvalidType(inputs.at(0), {"INT32"[, "INT64"]})

# TopK: ITopKLayer's K limit (the 10.1 matrix: "K input must be less than 3840"; TensorRT's API docs
# give K <= 3840 for 8.x as well).
TOPK_MAX_K = 3840


def _vkey(v: str) -> tuple[int, int]:
    """(major, minor) of "8.5", "10", "10.x", "10.1.3" …"""
    parts = str(v).strip().lower().removesuffix(".x").split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def resolve_version(min_trt: str | float) -> tuple[str, list[str]]:
    """(table version used for op support, every table version from the minimum on).

    Accepts "8.5", "8.6", "10", "10.x", "10.1", "11" …; versions newer than the newest stored table
    use that table (the caller reports it).
    """
    try:
        key = _vkey(str(min_trt))
    except ValueError:
        raise UsageError(f"min TensorRT version {min_trt!r} is not a version like 8.5, 8.6 or 10.0") from None
    if key < _vkey(VERSIONS[0]):
        raise UsageError(f"TensorRT {min_trt} is older than the oldest release bundles target "
                         f"({VERSIONS[0]}); choose 8.5 or newer")
    at_or_below = [v for v in VERSIONS if _vkey(v) <= key]
    base = at_or_below[-1]
    return base, [v for v in VERSIONS if _vkey(v) >= _vkey(base)]


def supported_ops(version: str) -> frozenset[str]:
    """Ops the matrix of `version` (a key of SOURCE["branches"]) marks supported."""
    ops = set(_SUPPORTED_8_5)
    for v, added in _ADDED.items():
        if _vkey(v) <= _vkey(version):
            ops.update(added)
    return frozenset(ops)


def _first_version(op: str) -> str | None:
    return next((v for v in VERSIONS if op in supported_ops(v)), None)


# -------------------------------------------------------------------------------------------- report


@dataclass
class LintReport:
    """Outcome of linting one graph: errors block a TensorRT build, warnings deserve a look."""

    graph: str
    min_trt: str
    ok: bool = True
    opset: int | None = None
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def error(self, op: str, node: str, message: str) -> None:
        self.errors.append({"op": op, "node": node, "message": message})
        self.ok = False

    def warn(self, op: str, node: str, message: str) -> None:
        self.warnings.append({"op": op, "node": node, "message": message})

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- graph


class _Graph:
    """Facts about one (sub)graph the checks need: constants, dtypes and ranks of tensors."""

    def __init__(self, graph):
        import onnx

        self.constants: dict[str, object] = {}  # name -> TensorProto (initializer or Constant node)
        for t in graph.initializer:
            self.constants[t.name] = t
        for n in graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = a.t
        self.types: dict[str, tuple[str, int | None]] = {}  # name -> (dtype name, rank)
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                rank = len(tt.shape.dim) if tt.HasField("shape") else None
                self.types[vi.name] = (onnx.TensorProto.DataType.Name(tt.elem_type), rank)
        for name, t in self.constants.items():
            self.types[name] = (onnx.TensorProto.DataType.Name(t.data_type), len(t.dims))

    def dtype(self, name: str) -> str | None:
        return self.types.get(name, (None, None))[0]

    def rank(self, name: str) -> int | None:
        return self.types.get(name, (None, None))[1]

    def value(self, name: str):
        """numpy value of a constant input, or None (not constant, or stored as external data)."""
        from onnx import numpy_helper

        t = self.constants.get(name)
        if t is None or t.data_location == 1:  # EXTERNAL and not loaded
            return None
        return numpy_helper.to_array(t)


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _check_dtypes(node, g: _Graph, versions: list[str], rep: LintReport) -> None:
    op, name = node.op_type, node.name
    dts = [g.dtype(i) for i in node.input if i]
    if op in _FLOAT_ONLY and dts and dts[0] and dts[0] not in _FLOAT:
        rep.error(op, name, f"{op} on {dts[0]} input: TensorRT's importer takes float tensors only")
    if op in _BOOL_ONLY and any(d and d != "BOOL" for d in dts):
        rep.error(op, name, f"{op} on {dts} inputs: TensorRT takes BOOL inputs only")
    if op in _NO_INT and dts and dts[0] and dts[0] not in _FLOAT and dts[0] != "BOOL":
        rep.error(op, name, f"{op} on {dts[0]} input: TensorRT rejects integer {op} (INT64 and INT32)")
    if op == "Pow" and any(d and d not in _FLOAT for d in dts):
        # elementwiseCheck(kPOW) rejects BOOL and INT32 operands, the exponent included
        rep.error(op, name, f"Pow on {dts} inputs: TensorRT's Pow takes float operands only")
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Greater", "Less", "GreaterOrEqual", "LessOrEqual") \
            and "BOOL" in dts:
        rep.error(op, name, f"{op} on BOOL inputs: TensorRT's elementwise layer rejects it")
    if op == "TopK" and "8.5" in versions and dts and dts[0] in ("INT32", "INT64"):
        rep.error(op, name, "TopK on an integer tensor: TensorRT 8.5 takes float inputs only (INT32 from 8.6)")


def _check_restrictions(node, g: _Graph, versions: list[str], rep: LintReport) -> None:
    """Per-op restrictions of the support matrix that transformer graphs run into.

    (No Range rule: 8.4's "float inputs must be initializers" is gone from the 8.5 matrix, and 8.5's
    importer handles a dynamic float limit by casting the element count to INT32.)
    """
    op, name = node.op_type, node.name
    trt8 = any(v.startswith("8.") for v in versions)
    if op == "TopK":
        k_name = _input(node, 1)
        if k_name is not None:  # opset >= 10: K is an input
            k = g.value(k_name)
            if k is None:
                if "8.5" in versions:  # 8.5's importer: assertIsWeights(K); 8.6 takes a tensor K
                    rep.error(op, name, "TopK's K must be a constant (initializer or Constant) for TensorRT 8.5")
            elif int(k.reshape(-1)[0]) > TOPK_MAX_K:
                rep.error(op, name, f"TopK K={int(k.reshape(-1)[0])} exceeds TensorRT's limit of {TOPK_MAX_K}")
        elif (_attr(node, "k") or 0) > TOPK_MAX_K:
            rep.error(op, name, f"TopK k={_attr(node, 'k')} exceeds TensorRT's limit of {TOPK_MAX_K}")
        if _attr(node, "sorted", 1) != 1:
            rep.error(op, name, "TopK sorted=0 is unsupported (TensorRT 10.1 matrix: `sorted` must be 1)")
    elif op in ("Slice", "Squeeze", "Unsqueeze", "CumSum") or (op.startswith("Reduce") and _input(node, 1)):
        idx = {"Slice": 3}.get(op, 1)
        axes = _input(node, idx)
        if axes is not None and axes not in g.constants:
            what = "axis" if op == "CumSum" else "axes"
            rep.error(op, name, f"{op}'s `{what}` input must be an initializer/constant for TensorRT")
    elif op in ("ScatterND", "ScatterElements"):
        if _attr(node, "reduction", b"none") != b"none":
            rep.error(op, name, f"{op} reduction={_attr(node, 'reduction')!r} is unsupported (8.x ignores it, "
                                "10.x rejects it)")
    elif op == "Trilu":
        r = g.rank(node.input[0])
        if trt8 and r is not None and r not in (2, 3):
            rep.error(op, name, f"Trilu on a rank-{r} tensor: TensorRT 8.x takes rank 2 or 3 only")
        elif r is not None and r < 2:
            rep.error(op, name, f"Trilu on a rank-{r} tensor: TensorRT needs rank >= 2")
    elif op == "Einsum" and trt8:
        eq = _attr(node, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        lhs = eq.split("->")[0].replace(" ", "")
        if "..." in lhs:
            rep.error(op, name, f"Einsum '{eq}': ellipsis is unsupported on TensorRT 8.x")
        elif any(len(set(term)) != len(term) for term in lhs.split(",")):
            rep.error(op, name, f"Einsum '{eq}': diagonal (repeated index) is unsupported on TensorRT 8.x")
        else:
            rep.warn(op, name, "Einsum: TensorRT 8.x does not broadcast between inputs; make sure shapes match")
    elif op == "Dropout":
        train = _input(node, 2)
        if train is not None and (g.value(train) is None or bool(g.value(train))):
            rep.error(op, name, "Dropout's training_mode must be a constant False for TensorRT")
    elif op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        rep.error(op, name, "LayerNormalization: TensorRT supports only the first output Y")
    elif op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        ctm = _attr(node, "coordinate_transformation_mode", b"half_pixel")
        if mode not in (b"nearest", b"linear"):
            rep.error(op, name, f"Resize mode {mode.decode()!r} is unsupported (nearest, linear)")
        if ctm not in (b"half_pixel", b"pytorch_half_pixel", b"tf_half_pixel_for_nn", b"asymmetric",
                       b"align_corners"):
            rep.error(op, name, f"Resize coordinate_transformation_mode {ctm.decode()!r} is unsupported")
        if _attr(node, "antialias", 0):
            rep.error(op, name, "Resize antialias=1 is unsupported")


def _check_int64(g: _Graph, graph, versions: list[str], rep: LintReport) -> None:
    """TensorRT 8.x has no INT64: I/O bindings become INT32 and constants are clamped to int32."""
    if not any(v.startswith("8.") for v in versions):
        return
    import numpy as np
    import onnx

    io64 = [v.name for v in list(graph.input) + list(graph.output) if g.dtype(v.name) == "INT64"]
    if io64:
        rep.warn("", "", f"int64 graph I/O {io64}: TensorRT 8.x binds these as INT32 (the runtime must feed/read "
                         "int32 there); TensorRT 10 keeps INT64")
    slicing = {i for n in graph.node if n.op_type == "Slice" for i in n.input[1:3]}
    for name, t in g.constants.items():
        if t.data_type == onnx.TensorProto.INT64 and name not in slicing:  # Slice bounds are clamped by design
            v = g.value(name)
            if v is not None and v.size and (v.max() > np.iinfo(np.int32).max or v.min() < np.iinfo(np.int32).min):
                rep.warn("", name, f"int64 constant {name!r} holds values outside int32: TensorRT 8.x clamps them")


def _check_inputs(graph, rep: LintReport) -> None:
    """Every dynamic input dim must carry a name: optimization profiles bound them per symbol."""
    inits = {t.name for t in graph.initializer}
    for v in graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        if not tt.HasField("shape"):
            rep.error("", v.name, f"input {v.name!r} has no shape: TensorRT needs its rank and profile bounds")
            continue
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                if d.dim_value <= 0:
                    rep.error("", v.name, f"input {v.name!r} dim {i} has non-positive size {d.dim_value}")
            elif not d.dim_param:
                rep.error("", v.name, f"input {v.name!r} dim {i} is dynamic but unnamed ('?'): name it (export "
                                      "with dynamic_axes) so optimization profiles can bound it")


def _walk(graph):
    """Yield (node, graph) for every node, subgraphs (If/Loop/Scan bodies) included."""
    for n in graph.node:
        yield n, graph
        for a in n.attribute:
            if a.HasField("g"):
                yield from _walk(a.g)
            for sub in a.graphs:
                yield from _walk(sub)


def lint_graph(model_or_path, min_trt: str = "8.5", name: str | None = None) -> LintReport:
    """Lint one ONNX graph (a path or an `onnx.ModelProto`) for TensorRT `min_trt` and newer."""
    import onnx

    if isinstance(model_or_path, (str, Path)):
        model = onnx.load(str(model_or_path), load_external_data=False)
        name = name or Path(model_or_path).name
    else:
        model = model_or_path
    base, versions = resolve_version(min_trt)
    rep = LintReport(graph=name or model.graph.name or "graph", min_trt=str(min_trt),
                     source={**{k: SOURCE[k] for k in ("repo", "file")}, "table": base,
                             **SOURCE["branches"][base], "also_checked": versions})
    if _vkey(str(min_trt)) > _vkey(VERSIONS[-1]):
        rep.warn("", "", f"no operator matrix newer than TensorRT {VERSIONS[-1]} is recorded; linted against "
                         f"{VERSIONS[-1]}")
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - inference is a helper; lint what we can without it
        rep.warn("", "", f"ONNX shape inference failed ({e}); dtype checks are partial")

    # opset: the default domain's version must be inside every checked release's range
    lo = max(_OPSET[v][0] for v in versions)
    hi = min(_OPSET[v][1] for v in versions)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            rep.opset = imp.version
            if not lo <= imp.version <= hi:
                rep.error("", "", f"opset {imp.version} is outside TensorRT {base}..{VERSIONS[-1]}'s range "
                                  f"[{lo}, {hi}]; re-export with an opset in that range")
        else:
            rep.error("", "", f"custom opset domain {imp.domain!r} imported: bundles use standard ONNX only")

    supported = supported_ops(base)
    hist: Counter[str] = Counter()
    facts: dict[int, _Graph] = {}
    for node, graph in _walk(model.graph):
        if id(graph) not in facts:
            facts[id(graph)] = _Graph(graph)
        g = facts[id(graph)]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            hist[f"{node.domain}::{op}"] += 1
            rep.error(op, node.name, f"{node.domain}::{op} is a custom-domain op: TensorRT would need a plugin "
                                     "(bundles must use standard ONNX ops only)")
            continue
        hist[op] += 1
        if op not in supported:
            first = _first_version(op)
            later = f" (first supported in {first})" if first else " (no TensorRT release lists it as supported)"
            rep.error(op, node.name, f"{op} is not supported by the TensorRT {base} ONNX parser{later}")
            continue
        _check_dtypes(node, g, versions, rep)
        _check_restrictions(node, g, versions, rep)
    _check_inputs(model.graph, rep)
    _check_int64(facts.get(id(model.graph)) or _Graph(model.graph), model.graph, versions, rep)
    rep.ops = dict(sorted(hist.items()))
    return rep


def lint_bundle(bundle_dir: str | Path, min_trt: str = "8.5") -> dict:
    """Lint every graph of a bundle (and its precision variants); write `reports/trt_lint.json`."""
    root = Path(bundle_dir)
    mpath = root / "manifest.json"
    if not mpath.exists():
        raise UsageError(f"{root} is not a bundle (manifest.json missing)")
    manifest = json.loads(mpath.read_text())
    graphs: dict[str, dict] = {}
    for name, entry in manifest.get("graphs", {}).items():
        files = {name: entry["file"]}
        # the `cpu` variant is ONNX Runtime's own optimized graph (contrib ops), never fed to TensorRT
        files.update({f"{name}@{var}": v["file"] for var, v in entry.get("variants", {}).items() if var != "cpu"})
        for key, rel in files.items():
            graphs[key] = lint_graph(root / rel, min_trt, name=rel).to_dict()
    _, versions = resolve_version(min_trt)
    report = {"min_trt": str(min_trt), "ok": all(g["ok"] for g in graphs.values()),
              "source": {**SOURCE, "checked": versions}, "graphs": graphs}
    atomic_write_text(root / "reports" / "trt_lint.json", json.dumps(report, indent=2))
    return report
