"""FP16 variants of a bundle's graphs (`onnx-fp16/`), with numerically sensitive nodes kept in FP32.

The conversion itself is onnxruntime's `convert_float_to_float16` (what onnxruntime-genai and the
ORT transformer optimizer use); this module only decides which nodes stay FP32 and keeps every graph
input and output in its original dtype, so the runtime feeds an FP16 variant exactly like the FP32
graph it came from. Nodes kept in FP32, and why:

* Softmax / LogSoftmax / TopK: attention probabilities and the head's log-probs (ranking of near-tied
  candidates decides acceptance), LayerNormalization (its variance overflows in FP16);
* RMSNorm / LayerNorm statistics: Pow(x, 2) → ReduceMean → Add(eps) → Sqrt → Div/Reciprocal; x²
  summed over the hidden width leaves FP16's range (65504) for activations of a few hundred;
* rotary embeddings: Sin/Cos and what computes their angles from the positions (FP16 spacing is
  already 2 at position 2048, so angles would be wrong by whole radians);
* tanh gates of the draft's gated cross-attention (Tanh of a parameter): small gate values are the
  signal, FP16 keeps ~3 significant digits of them.

What an FP16 graph must satisfy (realistic-feed tolerance, random-feed stress tolerance, greedy
agreement with fp32) is the parity policy in `export/parity.py`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from dream_export.core.integrity import record
from dream_export.errors import UsageError
from dream_export.io import atomic_dir, atomic_write_text, file_digest
from dream_export.runtime.bundle import GRAPHS

VARIANT = "fp16"
OUT_DIR = "onnx-fp16"

# Ops always kept in FP32 (on top of onnxruntime's DEFAULT_OP_BLOCK_LIST, which already has TopK,
# Range, CumSum, Min, Max …).
ALWAYS_FP32 = ("Softmax", "LogSoftmax", "TopK", "LayerNormalization", "ReduceMean", "ReduceSum",
               "ReduceSumSquare", "ReduceL2")
_NORM_TAIL = ("Add", "Sqrt", "Reciprocal", "Div")  # what follows ReduceMean(Pow(x, 2)) in an RMS/LayerNorm
_SHAPE_OPS = ("Shape", "Size")  # their outputs do not depend on values: stop walking back there


def fp32_nodes(model) -> dict[str, str]:
    """Names of the nodes to keep in FP32, each with the reason (see the module docstring)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    inits = {t.name for t in graph.initializer}
    keep: dict[str, str] = {}

    for n in graph.node:
        if n.op_type in ALWAYS_FP32:
            keep[n.name] = n.op_type
        # norm statistics: ReduceMean(Pow(x, 2)) and the eps/sqrt/reciprocal chain after it
        if n.op_type == "ReduceMean" and n.input and getattr(producer.get(n.input[0]), "op_type", "") == "Pow":
            keep[producer[n.input[0]].name] = "norm statistics"
            cur = n
            for _ in range(len(_NORM_TAIL)):
                nxt = [c for c in consumers[cur.output[0]] if c.op_type in _NORM_TAIL]
                if len(nxt) != 1:
                    break
                cur = nxt[0]
                keep[cur.name] = "norm statistics"
        # gates: tanh of a learned scalar (the exporter may route equal parameters through Identity)
        if n.op_type == "Tanh" and n.input:
            src = n.input[0]
            while getattr(producer.get(src), "op_type", "") == "Identity":
                src = producer[src].input[0]
            if src in inits or getattr(producer.get(src), "op_type", "") == "Constant":
                keep[n.name] = "tanh gate"
        # rotary angles: Sin/Cos and everything upstream of them (positions, inverse frequencies)
        if n.op_type in ("Sin", "Cos"):
            stack = [n]
            while stack:
                cur = stack.pop()
                if cur.name in keep and keep[cur.name] == "rotary":
                    continue
                keep[cur.name] = "rotary"
                if cur.op_type in _SHAPE_OPS:
                    continue
                stack.extend(producer[i] for i in cur.input if i in producer)
    return keep


def _name_nodes(model) -> None:
    """Give unnamed nodes unique names: the converter blocks nodes by name."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_fp16auto_{i}"
            while name in seen:
                name += "_"
            n.name = name
            seen.add(name)


def convert_graph(src: str | Path, dst: str | Path) -> dict:
    """Write an FP16 copy of ONNX graph `src` to `dst`; returns what stayed FP32 (counts by reason)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    _name_nodes(model)
    keep = fp32_nodes(model)
    fp16 = convert_float_to_float16(model, keep_io_types=True,
                                    op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(ALWAYS_FP32)),
                                    node_block_list=sorted(keep))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Protobuf cannot serialise 2 GiB; big graphs keep their weights next to them as the exporter does.
    big = sum(len(t.raw_data) for t in fp16.graph.initializer) > 1_800_000_000
    onnx.save_model(fp16, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=dst.name + ".data")
    counts: dict[str, int] = defaultdict(int)
    for reason in keep.values():
        counts[reason] += 1
    return dict(counts)


def convert_bundle(bundle_dir: str | Path, log=print) -> dict:
    """FP16 variants of every graph of a bundle into `onnx-fp16/`, registered in the manifest.

    Adds `manifest["graphs"][name]["variants"]["fp16"] = {"file", "sha256"}` for each graph and
    changes no other manifest key. The graphs are written into a temporary sibling directory first and
    the manifest is replaced atomically, so an interrupted run leaves the bundle as it was.
    """
    root = Path(bundle_dir)
    mpath = root / "manifest.json"
    if not mpath.exists():
        raise UsageError(f"{root} is not a bundle (manifest.json missing); create one with `dream-export export`")
    manifest = json.loads(mpath.read_text())
    summary = {}
    with atomic_dir(root / OUT_DIR) as tmp:
        for name in GRAPHS:
            entry = manifest["graphs"][name]
            summary[name] = convert_graph(root / entry["file"], tmp / f"{name}.onnx")
        if manifest.get("draft", {}).get("shares_weights_with") == "target":
            from dream_export.export.shared_weights import share_initializers

            # a self-spec draft's layers are the target's: stored once in FP16 too
            share_initializers(tmp / "target.onnx", tmp / "draft.onnx")
    for name in GRAPHS:
        path = root / OUT_DIR / f"{name}.onnx"
        manifest["graphs"][name].setdefault("variants", {})[VARIANT] = {
            "file": f"{OUT_DIR}/{name}.onnx", "sha256": file_digest(path)}
    if "files" in manifest:  # the bundle's integrity record covers the new variant's files too
        manifest["files"].update({f"{OUT_DIR}/{rel}": v for rel, v in record(root / OUT_DIR).items()})
    atomic_write_text(mpath, json.dumps(manifest, indent=2))
    log(f"wrote FP16 graphs to {root / OUT_DIR} (kept FP32: {summary})")
    return summary
