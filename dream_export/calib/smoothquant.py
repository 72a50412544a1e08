"""SmoothQuant (Xiao et al., 2023) on an ONNX graph: move activation outliers into the weights.

For the linears that share one activation X (q/k/v after a norm, gate/up, ...), with per input
channel j: s_j = max|X_j|^α / max|W_j|^(1-α); then X ← X / s and W ← diag(s)·W, which leaves the
product unchanged and flattens X's channels for per-tensor INT8. X / s is folded into the norm's
weight when X is a norm's `Mul(x, weight)` read only by the group, otherwise it is a Mul node.

Hand-written because onnxruntime's SmoothQuant option delegates to Intel Neural Compressor, an
optional heavy dependency not installed here; the transform itself is a few lines of numpy.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

S_CLIP = (1e-4, 1e4)  # keep scales finite where a channel is (near) zero in X or W


def channel_amax(model, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per last-axis channel max |value| of `tensors` over `feeds` (the fp32 graph with extra outputs)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tapped tensors
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        vals = sess.run(tensors, {k: v for k, v in f.items() if k in names})
        for t, v in zip(tensors, vals, strict=True):
            a = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            out[t] = a if t not in out else np.maximum(out[t], a)
    return out


def smooth(model, nodes: list[str], feeds: list[dict[str, np.ndarray]], alpha: float = 0.5):
    """SmoothQuant `nodes` (MatMuls with [in, out] initializer weights) in place; returns (model, info)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            uses[i] += 1
            consumers[i].append(n)
    producer = {o: n for n in graph.node for o in n.output}
    wanted = set(nodes)
    groups: dict[str, list] = defaultdict(list)
    for n in graph.node:
        if (n.name in wanted and n.op_type == "MatMul" and n.input[1] in inits and uses[n.input[1]] == 1
                and len(inits[n.input[1]].dims) == 2):
            groups[n.input[0]].append(n)
    amax = channel_amax(model, sorted(groups), feeds)
    info = {"alpha": alpha, "groups": 0, "folded": 0, "mul_nodes": 0}
    for x, members in groups.items():
        ws = [numpy_helper.to_array(inits[m.input[1]]) for m in members]
        w_max = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        a = amax.get(x)
        if a is None or a.shape != w_max.shape:
            continue
        s = np.where((a > 0) & (w_max > 0), a ** alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, *S_CLIP).astype(np.float32)
        for m, w in zip(members, ws, strict=True):
            inits[m.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), m.input[1]))
        info["groups"] += 1
        prod = producer.get(x)
        norm_w = _foldable_weight(prod, inits, uses, s.shape[0])
        if norm_w is not None and all(c in members for c in consumers[x]):
            w = numpy_helper.to_array(inits[norm_w])
            inits[norm_w].CopyFrom(numpy_helper.from_array((w / s).astype(np.float32), norm_w))
            info["folded"] += 1
            continue
        inv = f"{x}/smoothquant_inv_scale"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        xs = f"{x}/smoothquant"
        node = helper.make_node("Mul", [x, inv], [xs], name=f"{x}/SmoothQuantMul")
        # insert right before the first member so the graph stays topologically sorted
        pos = min(list(graph.node).index(m) for m in members)
        graph.node.insert(pos, node)
        for m in members:
            m.input[0] = xs
        info["mul_nodes"] += 1
    return model, info


def _foldable_weight(prod, inits, uses, channels: int) -> str | None:
    """The [channels] initializer of a norm's final `Mul(x, weight)`, when nothing else reads it."""
    if prod is None or prod.op_type != "Mul":
        return None
    for i in prod.input:
        t = inits.get(i)
        if t is not None and list(t.dims) == [channels] and uses[i] == 1:
            return i
    return None
