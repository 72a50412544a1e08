"""Latency model: the roofline time of every graph call on a target, and the speculative tokens/s it implies.

Per call, time = max(bytes / bandwidth, FLOPs / peak) + launch overhead, where
- bytes are what the call must stream from memory: the graph's weights (read once per call; batch-1
  decoding never reuses them from cache) and the cache slots in use (`Call.context`: the exported
  graphs read only the slots their masks span, not the full capacity), plus the call's own inputs and
  new KV rows. Weight and per-slot cache sizes come from `memory.estimate`, the planner's byte counts,
  so the two never disagree;
- FLOPs are 2 per multiply-add of every GEMM (from the parameter counts of `ModelDesc`/`DraftDesc`)
  plus attention (QKᵀ and AV over tokens × (used slots + tokens)). GEMMs run at the precision's tensor-core peak
  (INT8/FP8 at the integer peak), attention at the FP16 peak (FP32 builds: TF32, half the FP16 peak);
- overhead = one fixed cost per engine call (enqueue + stream synchronisation from the host) + a
  per-kernel gap × the kernels a call launches (`KERNELS_PER_LAYER` × layers). The constants below
  are estimates, not measurements: TensorRT's fused decoder layer launches about ten kernels (QKV
  GEMM, RoPE, fused attention, O GEMM, two norms, gate/up GEMM, activation, down GEMM, residual); ONNX
  Runtime on CPU runs the demo target's 1,013 nodes for 24 layers (~42 per layer) one by one.

Datasheet peaks make this a lower bound on latency (an upper bound on speed): real kernels reach
70-90% of peak bandwidth. Speculative throughput per round (the engine's loop, `runtime/engine.py`):
one draft context pass over the τ tokens accepted last round, depth − 1 tree steps over ≤ k frontier
nodes (the context pass already yields the first level), one verify pass over the tree:

    tokens/s = τ / (t_verify(N) + (depth − 1) · t_draft_step(k) + t_draft_ctx(τ))

against autoregressive decoding at 1 / t_verify(1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dream_export.errors import UsageError
from dream_export.runtime.tree import TreeSpec
from dream_export.targets.memory import DraftDesc, ModelDesc, estimate
from dream_export.targets.registry import Target

# Kernels (TensorRT) or graph nodes (ONNX Runtime) per transformer layer, and per call outside layers.
KERNELS_PER_LAYER = {"tensorrt": 10, "onnxruntime": 42}
KERNELS_PER_CALL = {"tensorrt": 6, "onnxruntime": 30}  # embeddings/masks, final norm, head, top-k
# Host cost of one engine call (enqueue + sync) and the gap per kernel launch, in microseconds. Jetson
# Arm cores enqueue more slowly than a server CPU; ORT's per-node dispatch is a few µs on x86.
CALL_US = {"jetson": 60.0, "datacenter": 20.0, "cpu": 30.0}
LAUNCH_US = {"jetson": 5.0, "datacenter": 3.0, "cpu": 2.5}


@dataclass(frozen=True)
class Peaks:
    """The rates one target offers a call at one precision."""

    bandwidth_gbs: float  # GB/s (decimal)
    gemm_tflops: float  # dense tensor-core TFLOPS (TOPS for int8/fp8) for the weights' GEMMs
    attn_tflops: float  # rate of the attention math (fp16, or tf32/fp32)
    call_us: float
    launch_us: float
    executor: str  # "tensorrt" or "onnxruntime" (sets the kernel count)
    source: str = "datasheet"


def target_peaks(target: Target, precision: str) -> Peaks:
    """Datasheet peaks of a GPU target at `precision` (the cpu target has none: see `measure.host_peaks`)."""
    target.check_precision(precision)
    if target.bandwidth_gbs is None or target.fp16_tflops is None:
        raise UsageError(f"{target.name} has no datasheet peaks; measure the host (dream_export.targets.measure)")
    fp16 = target.fp16_tflops
    int8 = target.int8_tops or fp16
    sm = tuple(int(x) for x in (target.sm or "0.0").split("."))
    fp32 = fp16 / 2 if sm >= (8, 0) else fp16 / 8  # TF32 tensor cores from Ampere; Volta runs FP32 on CUDA cores
    gemm = {"fp16": fp16, "int8": int8, "fp8": int8, "fp32": fp32}[precision]
    attn = fp32 if precision == "fp32" else fp16
    return Peaks(target.bandwidth_gbs, gemm, attn, CALL_US[target.kind], LAUNCH_US[target.kind], "tensorrt")


@dataclass(frozen=True)
class Capacities:
    """The fixed buffer sizes the graphs are exported with (each call attends over all of them)."""

    kv_capacity: int
    draft_capacity: int
    cross_capacity: int
    max_tree: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> Capacities:
        """From a bundle's manifest."""
        return cls(manifest["kv_capacity"], manifest["draft_capacity"], manifest["cross_capacity"],
                   manifest["max_tree"])

    @classmethod
    def from_plan(cls, kv_capacity: int, tree_size: int) -> Capacities:
        """The exporter's layout for a planned KV capacity and tree size (draft caches hold both)."""
        return cls(kv_capacity, kv_capacity + tree_size, kv_capacity + tree_size, tree_size)


@dataclass(frozen=True)
class Call:
    """One graph call: `tokens` new positions, `rows` gathered logit rows (target), `feats` appended
    target features (draft), `context` committed rows in the caches the call reads (capped at capacity)."""

    label: str
    graph: str  # vision | target | draft
    tokens: int = 1
    rows: int = 1
    feats: int = 0
    context: int = 0


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one call on one target."""

    label: str
    graph: str
    bytes: int
    gemm_flops: float
    attn_flops: float
    kernels: int
    memory_s: float
    compute_s: float
    overhead_s: float

    @property
    def seconds(self) -> float:
        """Roofline time + overhead."""
        return max(self.memory_s, self.compute_s) + self.overhead_s

    @property
    def bound(self) -> str:
        """Which term dominates: memory, compute or overhead."""
        terms = {"memory": self.memory_s, "compute": self.compute_s, "overhead": self.overhead_s}
        return max(terms, key=terms.__getitem__)

    def to_dict(self) -> dict:
        """JSON-able form with the derived fields."""
        return {**asdict(self), "seconds": self.seconds, "bound": self.bound}


class LatencyModel:
    """Bytes, FLOPs and kernel counts of the bundle's graph calls for one model and precision."""

    def __init__(self, model: ModelDesc, capacities: Capacities, precision: str = "fp16",
                 draft: DraftDesc | None = None):
        self.model, self.caps, self.precision = model, capacities, precision
        self.draft = draft or DraftDesc.from_model(model)
        self._act = 4 if precision == "fp32" else 2  # activations and KV: fp16 unless an fp32 build

    def _bytes(self, target: Target) -> dict[str, int]:
        """Weights and full-capacity caches from the memory planner (the same counts `plan` prints)."""
        plan = estimate(self.model, target, self.precision, self.caps.kv_capacity, self.caps.max_tree, self.draft,
                        workspace_mb=0)
        b = plan.breakdown()
        # the planner sizes both draft caches at kv_capacity + tree; scale to the bundle's own capacities
        per_slot = b["draft_cache"] / max(self.caps.kv_capacity + self.caps.max_tree, 1)
        draft_cache = int(per_slot * (self.caps.draft_capacity * self._self_blocks
                                      + self.caps.cross_capacity * self._cross_blocks) / self.draft.attention_blocks)
        return {"target": b["target_weights"], "vision": b["vision_weights"], "draft": b["draft_weights"],
                "kv": b["kv_cache"], "draft_cache": draft_cache}

    @property
    def _cross_blocks(self) -> int:
        return 1 if self.draft.cross_attention else 0

    @property
    def _self_blocks(self) -> int:
        return self.draft.attention_blocks - self._cross_blocks  # a self-spec draft's shared layers too

    def work(self, call: Call, target: Target) -> tuple[int, float, float, int]:
        """(bytes, GEMM FLOPs, attention FLOPs, kernels) of `call`; `target` only decides precisions."""
        b = self._bytes(target)
        executor_layers = 0
        if call.graph == "target":
            t, m = self.model.text, self.caps
            used = min(call.context, m.kv_capacity)
            slots = used + call.tokens
            gemm = 2.0 * call.tokens * t.num_layers * t.layer_params() + 2.0 * call.rows * t.vocab_size * t.hidden_size
            attn = 4.0 * t.num_layers * t.num_heads * t.head_dim * call.tokens * slots
            io = (call.tokens * t.hidden_size * (self._act + 4)  # embeddings in, hidden states out
                  + call.tokens * slots  # bool mask
                  + 2 * t.num_layers * t.num_kv_heads * t.head_dim * call.tokens * self._act)  # new K/V rows
            nbytes = b["target"] + b["kv"] * used // max(m.kv_capacity, 1) + io
            executor_layers = t.num_layers
        elif call.graph == "draft":
            d, m = self.draft, self.caps
            body, head = d.block_params()
            gemm = 2.0 * call.tokens * (body + head) + 2.0 * call.feats * 2 * d.hidden_size * d.num_kv_heads * d.head_dim
            used_self, used_cross = min(call.context, m.draft_capacity), min(call.context, m.cross_capacity)
            self_attn = self._self_blocks * (used_self + call.tokens)
            cross_attn = self._cross_blocks * (used_cross + call.feats)
            # a pruned last block attends with fewer query heads over the same keys
            attn = 4.0 * d.head_dim * call.tokens * (d.num_heads * (self_attn + cross_attn)
                                                     - d.pruned_heads * (used_self + call.tokens))
            io = (call.tokens + call.feats) * d.hidden_size * self._act * 2 + call.tokens * (
                used_self + used_cross + call.tokens + call.feats)
            cap_slots = self._self_blocks * m.draft_capacity + self._cross_blocks * m.cross_capacity
            used_slots = self._self_blocks * used_self + self._cross_blocks * used_cross
            nbytes = b["draft"] + b["draft_cache"] * used_slots // max(cap_slots, 1) + io
            executor_layers = d.attention_blocks
        elif call.graph == "vision":
            v = self.model.vision
            if v is None:
                raise UsageError(f"{self.model.name} has no vision tower")
            n = v.tokens * v.images_per_prompt
            gemm = 2.0 * n * v.params()
            attn = 4.0 * v.num_layers * v.hidden_size * v.tokens * n
            nbytes = b["vision"] + v.num_channels * v.image_size**2 * v.images_per_prompt * 4
            executor_layers = v.num_layers
        else:
            raise UsageError(f"unknown graph {call.graph!r}; expected vision, target or draft")
        return int(nbytes), gemm, attn, executor_layers

    def predict(self, call: Call, target: Target, peaks: Peaks | None = None) -> Prediction:
        """Roofline time of `call` on `target` (datasheet peaks unless `peaks` is given, e.g. measured)."""
        peaks = peaks or target_peaks(target, self.precision)
        nbytes, gemm, attn, layers = self.work(call, target)
        kernels = KERNELS_PER_LAYER[peaks.executor] * layers + KERNELS_PER_CALL[peaks.executor]
        return Prediction(call.label, call.graph, nbytes, gemm, attn, kernels,
                          memory_s=nbytes / (peaks.bandwidth_gbs * 1e9),
                          compute_s=gemm / (peaks.gemm_tflops * 1e12) + attn / (peaks.attn_tflops * 1e12),
                          overhead_s=(peaks.call_us + kernels * peaks.launch_us) * 1e-6)


# ------------------------------------------------------------------------------------ the decode loop


def decode_calls(tree: TreeSpec, tau: float, prompt_tokens: int = 64, context: int | None = None) -> list[Call]:
    """The calls whose latencies the report lists: vision, prefill, AR step, verify, draft ctx/step.

    Decode calls read `context` committed rows (default: the prompt, i.e. the first rounds of an answer).
    """
    accepted = max(1, round(tau))
    ctx = prompt_tokens if context is None else context
    return [
        Call("vision", "vision"),
        Call(f"target prefill ({prompt_tokens} tok)", "target", prompt_tokens, 1),
        Call("target decode (1 tok)", "target", 1, 1, context=ctx),
        Call(f"target verify ({tree.total} tok)", "target", tree.total, tree.total, context=ctx),
        Call(f"draft context ({accepted} tok)", "draft", accepted, accepted, accepted, context=ctx),
        Call(f"draft tree step ({tree.k} tok)", "draft", tree.k, tree.k, tree.k, context=ctx),
    ]


def speculative_rate(preds: dict[str, Prediction], tree: TreeSpec, tau: float) -> dict:
    """Tokens/s of speculative and autoregressive decoding from the per-call predictions of `decode_calls`."""
    by_graph = {p.label.split(" (")[0]: p.seconds for p in preds.values()}
    t_round = by_graph["target verify"] + (tree.depth - 1) * by_graph["draft tree step"] + by_graph["draft context"]
    spec = tau / t_round
    ar = 1.0 / by_graph["target decode"]
    return {"tau": tau, "tree": asdict(tree), "round_s": t_round, "spec_tokens_per_s": spec,
            "ar_tokens_per_s": ar, "speedup": spec / ar}


def predict_target(model: ModelDesc, capacities: Capacities, target: Target, precision: str, tree: TreeSpec,
                   tau: float, draft: DraftDesc | None = None, peaks: Peaks | None = None,
                   prompt_tokens: int = 64, context: int | None = None) -> dict:
    """Per-call predictions and the decode rate of one model on one target, as a JSON-able dict (decode
    calls at `context` committed rows, default the prompt)."""
    if tree.total > capacities.max_tree:
        raise UsageError(f"tree of {tree.total} nodes exceeds the graphs' max_tree {capacities.max_tree}")
    if not 1 <= tau <= tree.depth + 1:
        raise UsageError(f"tau {tau} is impossible for a depth-{tree.depth} tree (1 <= tau <= {tree.depth + 1})")
    lm = LatencyModel(model, capacities, precision, draft)
    preds = {c.label: lm.predict(c, target, peaks) for c in decode_calls(tree, tau, prompt_tokens, context)
             if c.graph != "vision" or model.vision is not None}
    rate = speculative_rate(preds, tree, tau)
    return {"target": target.name, "precision": precision, "capacities": asdict(capacities),
            "peaks": asdict(peaks or target_peaks(target, precision)),
            "calls": {k: p.to_dict() for k, p in preds.items()}, **rate}


def format_prediction(pred: dict) -> str:
    """A short table of per-call latencies and the decode rate."""
    lines = [f"predicted on {pred['target']} ({pred['precision']}; roofline + launch overhead, lower bound):"]
    for label, c in pred["calls"].items():
        lines.append(f"  {label:<28} {c['seconds'] * 1e3:>9.3f} ms  ({c['bound']}-bound, "
                     f"{c['bytes'] / 1e6:,.1f} MB, {(c['gemm_flops'] + c['attn_flops']) / 1e9:,.2f} GFLOP)")
    t = pred["tree"]
    lines.append(f"  speculative: {pred['spec_tokens_per_s']:,.1f} tok/s at tau {pred['tau']:g}, tree "
                 f"{t['k']},{t['depth']},{t['total']} vs autoregressive {pred['ar_tokens_per_s']:,.1f} tok/s "
                 f"(x{pred['speedup']:.2f})")
    return "\n".join(lines)


def fmt_rate(x: float) -> str:
    """Tokens/s with sensible precision for 0.1 .. 100k."""
    return f"{x:,.0f}" if x >= 100 or math.isinf(x) else f"{x:.1f}"
