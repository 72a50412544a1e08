"""Which nodes of a graph are quantized to INT8, and which stay in higher precision (with the reason).

Only linears with constant weights are quantized (MatMul/Gemm/Conv whose second input is an
initializer): per-channel INT8 weights, per-tensor INT8 activations. Everything else keeps its float
precision, by construction or by default policy:

* attention products (Q·Kᵀ, P·V): their operands are the runtime-owned KV cache rows, which stay float;
* the LM head (a linear whose weight has the vocabulary as a dimension): the ranking of near-tied
  candidates decides acceptance;
* linears whose input depends on the raw input stream (token embeddings, pixels) without a norm in
  between: the draft's block 0 has no input norm, so its q/k/v and o_proj see the raw stream, where
  spliced image features and text embeddings differ in scale by orders of magnitude (one per-tensor
  INT8 scale for both wiped out the draft on the demo: τ 6.4 → 1.3); the vision patch embedding reads
  raw pixels;
* norms, softmax, rotary angles, the draft's tanh gates: never linears, so never quantized; they are
  listed (same analysis as the FP16 conversion, `export/fp16.fp32_nodes`) so the TensorRT cache can
  leave their outputs unscaled too;
* whatever `--exclude` names: node-name globs (`*down_proj*`), op types (`Conv`), or `layer:I`, the
  I-th occurrence (negative: from the end) of every repeated linear, i.e. a decoder layer.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field

from dream_export.errors import UsageError

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
_LAYER_INDEX = re.compile(r"(?:(?<=layers\.)|(?<=blocks\.)|(?<=layer\.))\d+|_\d+(?=/|$)")


@dataclass
class Selection:
    """Nodes to quantize, nodes kept in higher precision (name → reason), tensors the TRT cache omits."""

    quantize: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    cache_skip: set[str] = field(default_factory=set)

    def summary(self) -> dict:
        return {"quantized": len(self.quantize), "kept": dict(Counter(self.kept.values()))}


def parse_exclude(text: str | None) -> list[str]:
    """Comma-separated exclusion items; `layer:I` items must carry an integer."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    for it in items:
        if it.startswith("layer:"):
            try:
                int(it.split(":", 1)[1])
            except ValueError as e:
                raise UsageError(f"--exclude {it!r}: layer:I takes an integer (0 = first, -1 = last)") from e
    return items


def layer_of(names: list[str], shapes: list[tuple[int, ...]] | None = None) -> dict[str, tuple[int, int]]:
    """node → (occurrence index, occurrences) of its role among the linears, in graph order.

    Role = node name without layer numbers, plus the weight shape. TorchScript names a module's k-th
    reuse `name_k` (and an unnamed op `MatMul_k`) and its first use `name`: all map to `name`.
    """
    stems = [_LAYER_INDEX.sub(lambda m: "" if m.group().startswith("_") else "#", n) for n in names]
    if shapes is not None:
        stems = [f"{s}{list(sh)}" for s, sh in zip(stems, shapes, strict=True)]
    total = Counter(stems)
    seen: Counter = Counter()
    out = {}
    for n, s in zip(names, stems, strict=True):
        out[n] = (seen[s], total[s])
        seen[s] += 1
    return out


def select_nodes(model, vocab: int, exclude: list[str] | None = None, raw_inputs: set[str] | None = None) -> Selection:
    """Quantization plan for one ONNX graph (`onnx.ModelProto`).

    `vocab` identifies the LM head; `raw_inputs` are the graph's un-normalized stream inputs (token
    embeddings, pixels), whose linears up to the first norm stay float.
    """
    from dream_export.export.fp16 import fp32_nodes

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    sensitive = fp32_nodes(model)
    norm_stats = {name for name, why in sensitive.items() if why in ("norm statistics", "ReduceMean")}
    raw_inputs = set(raw_inputs or ())
    sel = Selection()
    linears = []
    for n in graph.node:
        if n.op_type not in LINEAR_OPS:
            continue
        weight = inits.get(n.input[1]) if len(n.input) > 1 else None
        if weight is None:
            sel.kept[n.name] = "attention product (KV cache operand)"
        elif vocab in weight.dims:
            sel.kept[n.name] = "LM head"
        elif raw_inputs and _unnormalized(n.input[0], raw_inputs, producer, norm_stats):
            sel.kept[n.name] = "un-normalized input stream"
        else:
            linears.append(n)
    layers = layer_of([n.name for n in linears], [tuple(inits[n.input[1]].dims) for n in linears])
    for n in linears:
        reason = _excluded(n, layers[n.name], exclude or [])
        if reason:
            sel.kept[n.name] = reason
        else:
            sel.quantize.append(n.name)
    for name, why in sensitive.items():
        sel.kept.setdefault(name, why)
    # TensorRT's implicit INT8 runs a layer in INT8 only when its tensors have scales: leaving the
    # outputs of kept nodes out of the cache keeps those layers in float there too.
    by_name = {n.name: n for n in graph.node}
    for name in sel.kept:
        node = by_name.get(name)
        if node is not None:
            sel.cache_skip.update(o for o in node.output if o)
    return sel


def _unnormalized(tensor: str, raw: set[str], producer: dict, norm_stats: set[str]) -> bool:
    """Whether `tensor` depends on a raw stream input along a path that crosses no normalization
    (a node applying norm statistics: RMSNorm's x·rsqrt(mean x²), LayerNorm's (x−μ)/σ)."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in raw:
            return True
        node = producer.get(t)
        if node is None or node.name in seen or node.op_type in ("Shape", "Size"):
            continue  # shapes do not carry the stream's values
        seen.add(node.name)
        if any(getattr(producer.get(i), "name", None) in norm_stats for i in node.input):
            continue  # a normalization: what lies behind it is rescaled per token
        stack.extend(node.input)
    return False


def _excluded(node, layer: tuple[int, int], patterns: list[str]) -> str | None:
    idx, count = layer
    for p in patterns:
        if p.startswith("layer:"):
            want = int(p.split(":", 1)[1])
            if idx == (want if want >= 0 else count + want):
                return f"--exclude {p}"
        elif p == node.op_type or fnmatch.fnmatchcase(node.name, p):
            return f"--exclude {p}"
    return None
