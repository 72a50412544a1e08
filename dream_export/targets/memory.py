"""Memory planner: will a target VLM + DREAM draft fit on a device, and with which KV capacity and tree size.

Everything is counted in bytes from the model's dimensions (no weights are loaded, no torch), so the
check runs before an hour-long export or a TensorRT build that would fail on the device.

What is counted, and why:
- target weights: decoder layers + final norm + LM head (the graph's weights).
- vision weights: vision tower + projector.
- draft weights: DREAM's three decoder blocks at target width, plus its own copy of the LM head —
  separate TensorRT engines cannot share weight memory, so the "shared" head is resident twice. A
  self-spec draft's K target layers are stored once in the bundle but resident twice for the same reason.
- embedding table: the runtime keeps it in fp32 (lookup + image splice on the host); it uses device
  memory only on unified-memory devices (Jetson, CPU). On a discrete GPU it sits in host RAM and is not
  counted against the GPU.
- KV cache: 2 × layers × kv_heads × head_dim × capacity × 4 bytes (batch 1): the runtime allocates its
  caches as fp32 numpy buffers for every precision (the graphs keep fp32 I/O, so the TensorRT backend
  binds them in place). They are host memory mapped into the GPU: device memory on unified-memory
  devices, host RAM on a discrete GPU.
- draft caches: K/V of its self-attention blocks and of the cross-attention over target features, each
  capacity + tree slots, plus the runtime's per-position target features; fp32 like the KV cache.
- activations: an upper-bound estimate for each engine's largest optimization profile, times the
  engine's execution contexts: the backend makes one per profile, and TensorRT gives each the engine's
  device memory size, the maximum over all profiles (`getDeviceMemorySize`, NvInferRuntime.h).
- TensorRT workspace: the target's default pool (--memPoolSize=workspace), counted once because the
  runtime runs one engine at a time.
- runtime overhead: CUDA context and the TensorRT/cuBLAS libraries loaded into memory (an estimate).

Units: bytes internally; reports in GiB (2**30), the unit device capacities are sold in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dream_export.errors import UsageError
from dream_export.targets.registry import Target, get_target

GiB = 2**30
KV_LADDER: tuple[int, ...] = (4096, 2048, 1024, 512, 256)
TREE_LADDER: tuple[int, ...] = (64, 32, 16)
# CUDA context + TensorRT runtime + cuBLAS/cuDNN code resident in memory; measured values on Orin are
# 0.5–1 GiB depending on which libraries load. ONNX Runtime on CPU needs far less.
_RUNTIME_OVERHEAD_GPU = int(0.6 * GiB)
_RUNTIME_OVERHEAD_CPU = int(0.2 * GiB)

# Defaults of the transformers config classes for the sub-configs these families use. Hub configs
# store only the values that differ from these (llava-hf/llava-1.5-7b-hf's text_config has no
# hidden_size), so a planner that did not know them would misread real checkpoints. Kept here rather
# than imported because importing transformers pulls in torch.
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  vocab_size=32000, tie_word_embeddings=False),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=151936, tie_word_embeddings=False),
    "gemma3_text": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=262208, tie_word_embeddings=True),
}
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32, num_channels=3),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16, num_channels=3),
    "idefics3_vision": dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=32,
                            num_attention_heads=16, image_size=224, patch_size=32, num_channels=3),
    "pixtral": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=1024, patch_size=16, num_channels=3),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, patch_size=14,
                       in_channels=3, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584),
}
_DEFAULT_TEXT_TYPE = {"llava": "llama", "llava_next": "llama", "idefics3": "llama", "mistral3": "mistral",
                      "gemma3": "gemma3_text", "qwen2_5_vl": "qwen2"}
_DEFAULT_VISION_TYPE = {"llava": "clip_vision_model", "llava_next": "clip_vision_model",
                        "idefics3": "idefics3_vision", "mistral3": "pixtral", "gemma3": "siglip_vision_model",
                        "qwen2_5_vl": "qwen2_5_vl"}
# Vision towers whose MLP is gated (three matrices) rather than fc1/fc2.
_GATED_VISION = {"pixtral", "qwen2_5_vl"}


# ------------------------------------------------------------------------------------ descriptions


@dataclass(frozen=True)
class TextDesc:
    """The language decoder's dimensions."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention (GQA-aware), gated MLP, two norms."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.num_heads * hd * 2 + h * self.num_kv_heads * hd * 2  # q, o + k, v
        mlp = 3 * h * self.intermediate_size  # gate, up, down: every supported family is gated
        return attn + mlp + 2 * h


@dataclass(frozen=True)
class VisionDesc:
    """The vision tower and projector (parameters and the token count of one image)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    gated_mlp: bool = False
    projector_params: int = 0
    images_per_prompt: int = 1  # crops the tower runs per image (LLaVA-NeXT anyres: base + tiles)
    merge: int = 1  # patches folded into one decoder token (Qwen2.5-VL, Mistral3: 2x2; Idefics3: scale²)

    @property
    def tokens(self) -> int:
        """Patch tokens (+1 class token) of one crop."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def lm_tokens(self) -> int:
        """Image tokens the decoder reads for one image (every crop, after the projector's merge)."""
        return (self.image_size // self.patch_size) ** 2 // self.merge * self.images_per_prompt

    def params(self) -> int:
        """Tower + patch/position embeddings + projector."""
        h, i = self.hidden_size, self.intermediate_size
        mlp = 3 * h * i if self.gated_mlp else 2 * h * i + i + h
        layer = 4 * h * h + 4 * h + mlp + 4 * h  # qkvo (+bias), mlp, two norms (weight + bias)
        embeddings = self.num_channels * self.patch_size**2 * h + self.tokens * h
        return self.num_layers * layer + embeddings + self.projector_params


@dataclass(frozen=True)
class DraftDesc:
    """The DREAM draft: `num_blocks` decoder blocks at target width, plus its LM head copy."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_blocks: int = 3  # self-attn, gated cross-attn, self-attn
    cross_attention: bool = True
    fuse_inputs: int = 0  # EAGLE baselines: an input FC over `fuse_inputs` × hidden features
    last_block_heads: int | None = None  # a supernet sub-network: query heads left in the last block
    # self-spec: the target's first layers it runs. Stored once in the bundle, but loaded again by the
    # draft's own engine/session (separate engines share no weight memory) and with their own K/V rows
    shared_layers: int = 0

    @property
    def pruned_heads(self) -> int:
        """Query heads pruned from the last block (their Q rows and O columns are gone)."""
        return 0 if self.last_block_heads is None else self.num_heads - self.last_block_heads

    @classmethod
    def from_model(cls, model: ModelDesc) -> DraftDesc:
        """The default DREAM draft of `model`: three blocks at the target's width and head layout."""
        t = model.text
        return cls(t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size, t.vocab_size)

    @classmethod
    def from_config(cls, cfg: dict) -> DraftDesc:
        """From a `draft_config.json` dict (dream_export.draft.config.DraftConfig fields)."""
        arch = cfg.get("arch", "dream")
        cross = bool(cfg.get("cross_attention", True)) and arch == "dream"
        blocks = (3 if cross else 2) if arch == "dream" else 1
        if arch == "self-spec":
            blocks = int(cfg.get("imitation_blocks", 1))
        fuse = len(cfg.get("fuse_layers") or []) if arch == "eagle3" else (2 if arch == "eagle2" else 0)
        last = cfg.get("last_block_heads")
        shared = int(cfg.get("exit_layer", 0)) if arch == "self-spec" else 0
        return cls(cfg["hidden_size"], cfg["num_heads"], cfg.get("num_kv_heads") or cfg["num_heads"],
                   cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"], blocks, cross, fuse,
                   len(last) if last is not None else None, shared)

    def block_params(self) -> tuple[int, int]:
        """(parameters without the LM head, LM head parameters)."""
        text = TextDesc(1, self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                        self.intermediate_size, self.vocab_size)
        body = (self.num_blocks + self.shared_layers) * text.layer_params() + self.hidden_size  # + final norm
        if self.cross_attention:
            body += 2 * self.num_heads * self.head_dim + 2  # per-head Q/K norms, tanh gates
        body += self.fuse_inputs * self.hidden_size * self.hidden_size
        body -= 2 * self.pruned_heads * self.head_dim * self.hidden_size
        return body, self.vocab_size * self.hidden_size

    @property
    def attention_blocks(self) -> int:
        """Blocks holding a K/V cache: every block (self-attn caches + the cross-attn feature cache), and a
        self-spec draft's shared layers (it keeps their rows in its own cache)."""
        return self.num_blocks + self.shared_layers


@dataclass(frozen=True)
class ModelDesc:
    """A VLM as the planner sees it: decoder, optional vision tower, identity for messages."""

    name: str
    text: TextDesc
    vision: VisionDesc | None = None
    model_type: str = ""

    def lm_params(self) -> int:
        """Decoder + final norm + LM head + input embeddings (the usual "7B" count)."""
        t = self.text
        head = 0 if t.tie_word_embeddings else t.vocab_size * t.hidden_size
        return t.num_layers * t.layer_params() + t.hidden_size + head + t.vocab_size * t.hidden_size

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def _resolve(sub: dict | None, model_type: str | None, defaults: dict[str, dict[str, Any]]) -> dict:
    """A sub-config with the transformers defaults of its model_type filled in."""
    sub = dict(sub or {})
    mt = sub.get("model_type") or model_type or ""
    return {**defaults.get(mt, {}), **sub, "model_type": mt}


def _need(cfg: dict, *keys: str, where: str) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    raise UsageError(f"{where} has no {' / '.join(keys)}; cannot size the model "
                     f"(model_type {cfg.get('model_type')!r} has no known defaults)")


def describe_model(config: dict, name: str | None = None) -> ModelDesc:
    """Build a `ModelDesc` from a Hugging Face VLM `config.json` dict (LLaVA-style or flat).

    Reads `text_config` / `vision_config` (falling back to the top level for flat configs such as older
    Qwen2.5-VL files), fills keys a hub config omits with the transformers defaults of the sub-config's
    model_type, and honours an explicit `head_dim` (Gemma3, Pixtral: not hidden/heads).
    """
    if not isinstance(config, dict):
        raise UsageError("describe_model expects the parsed config.json dict")
    top_type = config.get("model_type", "")
    text = _resolve(config.get("text_config") if "text_config" in config else config,
                    _DEFAULT_TEXT_TYPE.get(top_type, "llama" if "text_config" in config else None), _TEXT_DEFAULTS)
    where = "text_config" if "text_config" in config else "config"
    hidden = int(_need(text, "hidden_size", where=where))
    heads = int(_need(text, "num_attention_heads", where=where))
    text_desc = TextDesc(
        num_layers=int(_need(text, "num_hidden_layers", where=where)), hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        intermediate_size=int(_need(text, "intermediate_size", where=where)),
        vocab_size=int(_need(text, "vocab_size", where=where)),
        # transformers ties the head only when the config says so (default False for Llama/Mistral/Qwen)
        tie_word_embeddings=bool(text.get("tie_word_embeddings",
                                          config.get("tie_word_embeddings", False))),
    )
    vision_desc = None
    if config.get("vision_config") is not None:
        vision_desc = _describe_vision(config, top_type, hidden)
    label = name or config.get("_name_or_path") or top_type or "model"
    return ModelDesc(str(label), text_desc, vision_desc, top_type)


def _describe_vision(config: dict, top_type: str, text_hidden: int) -> VisionDesc:
    v = _resolve(config["vision_config"], _DEFAULT_VISION_TYPE.get(top_type, "clip_vision_model"), _VISION_DEFAULTS)
    vt = v["model_type"]
    h = int(_need(v, "hidden_size", where="vision_config"))
    inter = int(_need(v, "intermediate_size", where="vision_config"))
    layers = int(_need(v, "num_hidden_layers", "depth", where="vision_config"))
    heads = int(_need(v, "num_attention_heads", "num_heads", where="vision_config"))
    patch = int(_need(v, "patch_size", where="vision_config"))
    image = int(v.get("image_size") or 448)  # Qwen2.5-VL has dynamic resolution; 448 is a typical side
    channels = int(v.get("num_channels") or v.get("in_channels") or 3)
    if "projector_hidden_act" in config or top_type in ("llava", "llava_next"):
        projector = h * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden  # 2-layer MLP
    elif top_type == "idefics3":
        scale = int(config.get("scale_factor") or 2)
        projector = h * scale * scale * text_hidden  # pixel shuffle then one linear
    elif top_type == "qwen2_5_vl":
        merge = int(v.get("spatial_merge_size") or 2)
        d = h * merge * merge
        projector = d * d + d + d * int(v.get("out_hidden_size") or text_hidden)
    else:  # Gemma3 / Mistral3: norm + linear (Mistral3 adds a patch merger; small next to the tower)
        projector = h * text_hidden + h
    patches = (image // patch) ** 2
    merge = {"qwen2_5_vl": int(v.get("spatial_merge_size") or 2) ** 2,
             "mistral3": int(config.get("spatial_merge_size") or 2) ** 2,
             "idefics3": int(config.get("scale_factor") or 2) ** 2,
             "gemma3": max(1, patches // int(config.get("mm_tokens_per_image") or 256))}.get(top_type, 1)
    crops = 1
    if top_type == "llava_next" and config.get("image_grid_pinpoints"):
        # anyres: the base image plus as many tiles as the largest grid pinpoint holds
        crops = 1 + max((a // image) * (b // image) for a, b in config["image_grid_pinpoints"])
    return VisionDesc(layers, h, inter, heads, patch, image, channels, vt in _GATED_VISION, projector, crops, merge)


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class MemoryItem:
    """One line of the breakdown; `on_device` is False for host-resident items on discrete GPUs."""

    name: str
    bytes: int
    on_device: bool = True
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """What fits: the chosen KV capacity and tree size, and the byte breakdown behind the decision."""

    model: str
    target: str
    precision: str
    kv_capacity: int
    tree_size: int
    usable_bytes: int
    items: tuple[MemoryItem, ...] = field(default_factory=tuple)

    @property
    def device_bytes(self) -> int:
        """Bytes that count against the target's memory."""
        return sum(i.bytes for i in self.items if i.on_device)

    @property
    def host_bytes(self) -> int:
        """Bytes kept in host RAM (discrete GPUs only)."""
        return sum(i.bytes for i in self.items if not i.on_device)

    @property
    def headroom_bytes(self) -> int:
        """Usable memory left after the plan (negative: does not fit)."""
        return self.usable_bytes - self.device_bytes

    @property
    def fits(self) -> bool:
        """Whether the device bytes fit in the usable memory."""
        return self.headroom_bytes >= 0

    def breakdown(self) -> dict[str, int]:
        """name -> bytes, in breakdown order."""
        return {i.name: i.bytes for i in self.items}

    def to_dict(self) -> dict:
        """JSON-able form (reports, manifest)."""
        return {"model": self.model, "target": self.target, "precision": self.precision,
                "kv_capacity": self.kv_capacity, "tree_size": self.tree_size,
                "usable_bytes": self.usable_bytes, "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes, "items": [asdict(i) for i in self.items]}

    def format(self) -> str:
        """A short human-readable table."""
        lines = [f"{self.model} on {self.target} ({self.precision}, KV capacity {self.kv_capacity}, "
                 f"tree {self.tree_size})"]
        for i in self.items:
            where = "" if i.on_device else "  (host RAM)"
            lines.append(f"  {i.name:<18} {_gib(i.bytes):>9}{where}")
        lines.append(f"  {'total on device':<18} {_gib(self.device_bytes):>9}   of {_gib(self.usable_bytes)} usable")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


_WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "fp8": 1}
# The runtime's caches, features and embedding table are fp32 numpy buffers whatever the engines'
# precision (runtime/engine.py, runtime/pipeline.py).
_RUNTIME_BUFFER_BYTES = 4
# Execution contexts per engine: `TensorRTBackend` makes one per optimization profile (vision: its one
# static shape; target: prefill + verify; draft: context pass + tree step, `bundle_builds`).
ENGINE_CONTEXTS: dict[str, int] = {"vision": 1, "target": 2, "draft": 2}


def _act_bytes(precision: str) -> int:
    # Activations stay fp16 in INT8/FP8 builds (Q/DQ quantizes GEMM inputs only), fp32 in fp32 builds.
    return 4 if precision == "fp32" else 2


def _activation_bytes(model: ModelDesc, draft: DraftDesc, precision: str, capacity: int, tree: int) -> dict[str, int]:
    """Upper-bound activation memory of each engine's largest profile (engine -> bytes).

    TensorRT reuses activation buffers between layers, so the peak is a few layer-sized tensors, not
    one per layer. Per engine: two residual-stream-sized live sets (ping-pong) of
    tokens × (4·hidden + 2·intermediate) — q/k/v/o and gate/up widths — plus one layer's attention
    score matrix heads × tokens × keys (assumes TensorRT does not fuse attention; it often does, so
    this errs on the safe side), plus fp32 logits. The largest token count is the KV capacity for the
    target's prefill profile and for the draft's context-pass profile (a prompt may fill the cache, and
    the draft's first pass runs over the whole prompt); the target gathers logits at `tree` rows, the
    draft computes them at every position (its top-k per token).
    """
    b = _act_bytes(precision)
    t = model.text
    stream = 2 * capacity * (4 * t.hidden_size + 2 * t.intermediate_size) * b
    scores = t.num_heads * capacity * capacity * b
    target = stream + scores + tree * t.vocab_size * 4
    d_stream = 2 * capacity * (4 * draft.hidden_size + 2 * draft.intermediate_size) * b
    d_scores = draft.num_heads * capacity * (capacity + tree) * b
    draft_act = d_stream + d_scores + capacity * draft.vocab_size * 4
    vision = 0
    if model.vision is not None:
        v, n = model.vision, model.vision.tokens * model.vision.images_per_prompt
        vision = 2 * n * (4 * v.hidden_size + 2 * v.intermediate_size) * b + v.num_heads * n * v.tokens * b
    return {"vision": vision, "target": target, "draft": draft_act}


def estimate(model: ModelDesc, target: Target | str, precision: str, kv_capacity: int, tree_size: int,
             draft: DraftDesc | None = None, workspace_mb: int | None = None) -> MemoryPlan:
    """The byte breakdown of one configuration, fitting or not (see `plan_memory` to choose one)."""
    tgt = get_target(target) if isinstance(target, str) else target
    tgt.check_precision(precision)
    draft = draft or DraftDesc.from_model(model)
    t = model.text
    wb = _WEIGHT_BYTES[precision]
    # LM heads stay fp16 in INT8/FP8 builds: quantizing the vocabulary projection costs accuracy for a
    # small share of the weights.
    head_b = 4 if precision == "fp32" else 2
    decoder = t.num_layers * t.layer_params() * wb + t.hidden_size * 2
    head = t.vocab_size * t.hidden_size * head_b  # a tied head still exists in the graph as a MatMul
    draft_body, draft_head = draft.block_params()
    cb = _RUNTIME_BUFFER_BYTES
    kv = 2 * t.num_layers * t.num_kv_heads * t.head_dim * kv_capacity * cb
    slots = kv_capacity + tree_size
    draft_kv = (2 * draft.attention_blocks * draft.num_kv_heads * draft.head_dim + t.hidden_size) * slots * cb
    unified = tgt.unified_memory
    acts = _activation_bytes(model, draft, precision, kv_capacity, tree_size)
    contexts = " + ".join(f"{ENGINE_CONTEXTS[e]}x {e}" for e in acts if acts[e])
    workspace = (workspace_mb if workspace_mb is not None else tgt.default_workspace_mb) * 2**20
    items = [
        MemoryItem("target_weights", decoder + head, note=f"{t.num_layers} layers + LM head"),
        MemoryItem("vision_weights", model.vision.params() * wb if model.vision else 0,
                   note="vision tower + projector"),
        MemoryItem("draft_weights", draft_body * wb + draft_head * head_b,
                   note=f"{draft.num_blocks} blocks + own LM head copy"
                   + (f" + {draft.shared_layers} target layers loaded again" if draft.shared_layers else "")),
        MemoryItem("embedding_table", t.vocab_size * t.hidden_size * cb, on_device=unified,
                   note="kept by the runtime (fp32)"),
        MemoryItem("kv_cache", kv, on_device=unified, note=f"capacity {kv_capacity}, fp32 runtime buffers"),
        MemoryItem("draft_cache", draft_kv, on_device=unified,
                   note=f"capacity {kv_capacity} + tree {tree_size}, fp32 runtime buffers + target features"),
        MemoryItem("activations", sum(ENGINE_CONTEXTS[e] * n for e, n in acts.items()),
                   note=f"upper bound per context, largest profile; contexts: {contexts}"),
        MemoryItem("workspace", workspace, note="TensorRT workspace pool"),
        MemoryItem("runtime_overhead", _RUNTIME_OVERHEAD_CPU if tgt.kind == "cpu" else _RUNTIME_OVERHEAD_GPU,
                   note="CUDA context + libraries (estimate)"),
    ]
    return MemoryPlan(model.name, tgt.name, precision, kv_capacity, tree_size, tgt.usable_memory_bytes,
                      tuple(items))


def plan_memory(model: ModelDesc | dict, target: Target | str, precision: str = "fp16", *,
                draft: DraftDesc | None = None, kv_capacity: int | None = None, tree_size: int | None = None,
                kv_ladder: tuple[int, ...] = KV_LADDER, tree_ladder: tuple[int, ...] = TREE_LADDER,
                workspace_mb: int | None = None) -> MemoryPlan:
    """Choose the largest KV capacity, then the largest tree size, that fit on `target`.

    `model` is a `ModelDesc` or a config.json dict. A fixed `kv_capacity` / `tree_size` restricts the
    search to that value. Raises `UsageError` with the numbers (needed vs usable, the biggest items)
    when even the smallest configuration does not fit.
    """
    desc = describe_model(model) if isinstance(model, dict) else model
    tgt = get_target(target) if isinstance(target, str) else target
    caps = (kv_capacity,) if kv_capacity is not None else tuple(sorted(kv_ladder, reverse=True))
    trees = (tree_size,) if tree_size is not None else tuple(sorted(tree_ladder, reverse=True))
    plan = None
    # KV capacity first: a longer context is worth more to a VLM (image tokens alone can take 2880
    # positions) than a wider draft tree, whose acceptance gains flatten beyond ~32 nodes.
    for cap in caps:
        for tree in trees:
            plan = estimate(desc, tgt, precision, cap, tree, draft, workspace_mb)
            if plan.fits:
                return plan
    assert plan is not None  # the ladders are non-empty
    raise UsageError(_refusal(plan, tgt))


def _refusal(plan: MemoryPlan, tgt: Target) -> str:
    biggest = sorted((i for i in plan.items if i.on_device), key=lambda i: -i.bytes)[:3]
    parts = ", ".join(f"{i.name} {i.bytes / GiB:.1f}" for i in biggest)
    reserve = f" ({tgt.memory_gb:g} GiB minus {tgt.os_reserve_gb:g} for the OS)" if tgt.unified_memory else ""
    hint = []
    if plan.precision in ("fp32", "fp16") and tgt.supports("int8"):
        hint.append("an int8 build")
    hint.append("a smaller model or a larger target")
    return (f"{plan.model} in {plan.precision} needs {plan.device_bytes / GiB:.1f} GiB even with KV capacity "
            f"{plan.kv_capacity} and tree size {plan.tree_size} (largest: {parts} GiB); {tgt.name} has "
            f"{plan.usable_bytes / GiB:.1f} GiB usable{reserve}. Try {' or '.join(hint)}.")
