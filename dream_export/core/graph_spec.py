"""The I/O contract of every bundle graph, declared once: tensor names, symbolic axes and roles.

Everything else is derived from these specs: the exporter's input/output names and dynamic axes,
the manifest's `bindings` table (role → tensor name, the only way the runtime, calibrator and
builder find a tensor), parity feeds, calibration capture and concrete shapes for build profiles.
Exported graphs record their actual I/O (names, dtypes, symbolic shapes) in the manifest; readers
use the manifest, this module only says what each name and symbol means.

No torch, no onnx: the runtime imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# The symbolic dims, each meaning declared once. A graph's concrete call sets them all (see `input_shapes`).
SYMBOLS: dict[str, str] = {
    "tokens": "new positions in this call (prompt tokens at prefill, tree nodes at verification)",
    "slots": "target attention-mask columns: the cache slots the call reads (the used rows, or the whole "
             "capacity in bundles without `slots: used`) followed by the `tokens` new rows",
    "rows": "positions whose logits the target gathers (`logit_rows`)",
    "self_slots": "draft self-attention mask columns: cache slots read, then the `tokens` new rows",
    "feats": "target features appended to the draft's cross-attention cache in this call",
    "cross_slots": "draft cross-attention mask columns: cache slots read, then the `feats` new features",
    "patches": "vision patches of a dynamic-resolution image (Qwen2.5-VL: t·h·w of its grid)",
    "units": "merged patch units of such an image (`patches` / merge²): its prompt tokens",
}

# What a tensor is to its readers. Runtime-owned caches are resident: allocated once at capacity and
# bound in place on every call (backends must not copy them per call).
ROLES: dict[str, str] = {
    "pixels": "preprocessed image",
    "embeds": "token embeddings (un-normalized input stream)",
    "positions": "rotary positions",
    "mask": "boolean attention mask [1, tokens, slots]",
    "cache": "runtime-owned resident KV cache at full capacity",
    "table": "runtime-owned resident constant (the scaled token-embedding table)",
    "rows": "indices of the positions to gather logits at",
    "feature": "hidden states: target features for the draft, or the draft's own predicted features",
    "cache_rows": "this call's new KV rows, for the runtime to commit into its cache",
    "topk": "top-k token ids / log-probs per gathered row",
    "logits": "full-vocabulary logits at the gathered rows (sampling)",
    "importance": "attention each cache slot receives in the last layer (visual-token compression)",
    "importance_max": "the highest attention any query of any head gives each cache slot in the last layer",
    "image_embeds": "projected image features to splice into the prompt",
    "ids": "drafted token ids",
    "grid": "integer bookkeeping of a dynamic-resolution image's patch grid (window order, rotary positions, "
            "attention masks), computed by the runtime (`runtime.vision_grid`)",
}


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: its name (also its binding role), dynamic axes, role and optionality."""

    name: str
    role: str
    axes: Mapping[int, str] = field(default_factory=dict)
    # optional outputs exist only with some export options; optional inputs may be pruned by ONNX when
    # unused (an EAGLE-style `prev_feat` in a DREAM draft, `prev_taps` in any but an EAGLE-3 draft)
    optional: bool = False


@dataclass(frozen=True)
class GraphSpec:
    """A graph's inputs and outputs, in the order of the exported module's forward signature / results."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self, present: Iterable[str] | None = None) -> list[str]:
        """Output names; optional ones only where listed in `present` (all of them when None)."""
        keep = None if present is None else set(present)
        return [t.name for t in self.outputs if not t.optional or keep is None or t.name in keep]

    def tensor(self, name: str) -> Tensor:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name} has no tensor {name!r}")

    def dynamic_axes(self, names: Iterable[str]) -> dict[str, dict[int, str]]:
        """`torch.onnx.export` dynamic axes of the tensors `names` (those with any)."""
        return {n: dict(self.tensor(n).axes) for n in names if self.tensor(n).axes}

    def bindings(self, names: Iterable[str]) -> dict[str, str]:
        """The manifest's role → tensor-name table over the tensors the exported graph really has."""
        return {self.tensor(n).name: n for n in names}


def _t(name: str, role: str, axes: Mapping[int, str] | None = None, optional: bool = False) -> Tensor:
    return Tensor(name, role, dict(axes or {}), optional)


# One image per request: the exported tower splits the CLS token with a fixed batch of 1 (static shapes).
# Qwen2.5-VL's windowed tower also takes its grid's bookkeeping (`runtime.vision_grid.vision_grid_inputs`):
# pixel_values are then its flattened patches [patches, 3·T·p·p]; masks and positions in window order.
VISION = GraphSpec("vision", inputs=(
    _t("pixel_values", "pixels"), _t("window_index", "grid", {0: "units"}, optional=True),
    _t("reverse_index", "grid", {0: "units"}, optional=True),
    _t("patch_positions", "grid", {0: "patches"}, optional=True),
    _t("full_mask", "grid", {0: "patches", 1: "patches"}, optional=True),
    _t("window_mask", "grid", {0: "patches", 1: "patches"}, optional=True)),
    outputs=(_t("image_embeds", "image_embeds"),))

# past_key/past_value: [layers, 1, kv_heads, capacity, head_dim]; attention_mask [1, tokens, slots]: which
# of the first `slots - tokens` cache slots (the graph reads only those) and which new rows each query sees.
TARGET = GraphSpec(
    "target",
    inputs=(_t("inputs_embeds", "embeds", {1: "tokens"}), _t("position_ids", "positions", {1: "tokens"}),
            _t("attention_mask", "mask", {1: "tokens", 2: "slots"}), _t("past_key", "cache"),
            _t("past_value", "cache"), _t("logit_rows", "rows", {0: "rows"})),
    # hidden: final-norm states (the draft's features); new_key/new_value: this call's KV rows;
    # topk_*: verification signal at `logit_rows` only; row_logits: full logits at those rows (sampling)
    outputs=(_t("hidden", "feature", {1: "tokens"}), _t("new_key", "cache_rows", {3: "tokens"}),
             _t("new_value", "cache_rows", {3: "tokens"}), _t("topk_ids", "topk", {0: "rows"}),
             _t("topk_logprobs", "topk", {0: "rows"}), _t("row_logits", "logits", {0: "rows"}),
             _t("attn_importance", "importance", {0: "slots"}, optional=True),
             _t("attn_importance_max", "importance_max", {0: "slots"}, optional=True),
             _t("taps", "feature", {1: "tokens"}, optional=True)),
)

_DRAFT_CONTEXT = (
    _t("embeds", "embeds", {1: "tokens"}), _t("positions", "positions", {1: "tokens"}),
    _t("self_mask", "mask", {1: "tokens", 2: "self_slots"}), _t("self_key", "cache"), _t("self_value", "cache"),
    _t("cross_key", "cache"), _t("cross_value", "cache"), _t("new_feats", "feature", {1: "feats"}),
    _t("cross_mask", "mask", {1: "tokens", 2: "cross_slots"}),
)
_DRAFT_ROWS = (
    _t("new_self_key", "cache_rows", {3: "tokens"}), _t("new_self_value", "cache_rows", {3: "tokens"}),
    _t("new_cross_key", "cache_rows", {2: "feats"}), _t("new_cross_value", "cache_rows", {2: "feats"}),
)

# prev_feat [1, tokens, H]: each query's predecessor feature (EAGLE-style drafts); prev_taps [1, tokens,
# taps·H]: an EAGLE-3 draft's predecessor as the target's concatenated layer taps, fused inside the graph
# (the context pass feeds these, tree and chain steps the draft's own feature in prev_feat; zeros in the other)
DRAFT = GraphSpec(
    "draft",
    inputs=(*_DRAFT_CONTEXT, _t("prev_feat", "feature", {1: "tokens"}, optional=True),
            _t("prev_taps", "feature", {1: "tokens"}, optional=True)),
    outputs=(_t("feature", "feature", {1: "tokens"}), _t("topk_ids", "topk", {0: "tokens"}),
             _t("topk_logprobs", "topk", {0: "tokens"}), *_DRAFT_ROWS),
)

# A chain round in one call (CPU backends pay per call, not per node): the draft graph's context pass
# (same inputs) then greedy steps; embed_table: the runtime's (scaled) token embeddings, read by each
# step's argmax. chain_ids: the round's drafted tokens; new_*: the context rows to commit.
DRAFT_CHAIN = GraphSpec(
    "draft_chain",
    inputs=(*_DRAFT_CONTEXT, _t("embed_table", "table")),
    outputs=(_t("chain_ids", "ids"), *_DRAFT_ROWS),
)

SPECS: dict[str, GraphSpec] = {s.name: s for s in (VISION, TARGET, DRAFT, DRAFT_CHAIN)}


def spec(graph: str) -> GraphSpec:
    """The spec of a bundle graph by name."""
    return SPECS[graph]


def role_tensors(entry: Mapping, graph: str, *roles: str) -> set[str]:
    """Tensor names (through the manifest entry's bindings) of a graph's tensors with one of `roles`."""
    s = spec(graph)
    return {name for binding, name in entry.get("bindings", {}).items() if s.tensor(binding).role in roles}


def input_shapes(entry: Mapping, symbols: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input of a manifest graph entry, its symbolic dims set from `symbols`.

    Raises KeyError naming the symbol when `symbols` lacks one the entry uses.
    """
    out = {}
    for io in entry["inputs"]:
        dims = []
        for d in io["shape"]:
            if isinstance(d, str):
                if d not in symbols:
                    raise KeyError(f"input {io['name']!r} needs symbol {d!r} (got {sorted(symbols)})")
                dims.append(int(symbols[d]))
            else:
                dims.append(int(d))
        out[io["name"]] = tuple(dims)
    return out
