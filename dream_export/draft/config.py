"""Draft configuration, derived from the target's text config so one draft class fits every family."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCHS = ("dream", "eagle2", "eagle3", "self-spec")


def default_exit_layer(num_layers: int) -> int:
    """The exit layer of a self-spec draft when none is given: a sixth of the depth. On the demo (24
    layers) exits after 4, 8 and 12 layers at one training budget gave the best end-to-end speedup at 4:
    each draft call costs (K + 1)/L of a target pass, and τ grew only a few percent with K
    (docs/ARCHITECTURE.md, "Self-speculative drafts")."""
    return max(1, round(num_layers / 6))


def check_exit_layer(exit_layer: int, num_layers: int, imitation_blocks: int = 1) -> None:
    """Refuse a self-spec exit layer outside 1..num_layers-1 (layer 0 is the embeddings, and exiting at
    the last layer would be the target itself) or an imitation network other than 1 or 2 blocks."""
    from dream_export.errors import UsageError

    if not 1 <= exit_layer < num_layers:
        raise UsageError(f"--exit-layer {exit_layer} is out of range: the target has {num_layers} decoder layers, "
                         f"so the draft exits after one of layers 1..{num_layers - 1}")
    if imitation_blocks not in (1, 2):
        raise UsageError(f"--imitation-blocks {imitation_blocks}: the imitation network has 1 or 2 blocks")


@dataclass
class DraftConfig:
    """Shape and flavour of a draft model; `arch` picks DREAM or one of the EAGLE baselines."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    norm_flavour: str = "rms"  # "gemma_rms": weight applied as (1 + w), as the Gemma family does
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    final_logit_softcapping: float | None = None
    arch: str = "dream"
    # DREAM ablation: without the cross-attention block the draft is blocks 0 and 2 only.
    cross_attention: bool = True
    # EAGLE-3 fuses the features of three target layers (low, mid, high); indices into hidden_states.
    fuse_layers: list[int] = field(default_factory=list)
    target_num_layers: int = 0
    # A learned null key keeps the first query's cross-attention defined. Converted upstream checkpoints
    # were trained without it: there the null slot is used only by rows with no visible feature.
    null_key: bool = True
    # A sub-network exported from a supernet (DREAM-S): the KV head each kept query head of the last
    # self-attention block reads, in order (groups may be uneven); None keeps every head, grouped evenly.
    last_block_heads: list[int] | None = None
    # self-spec: the target's first `exit_layer` decoder layers (shared, not copied) + `imitation_blocks`
    exit_layer: int = 0
    imitation_blocks: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown draft arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.arch == "self-spec":
            check_exit_layer(self.exit_layer, self.target_num_layers, self.imitation_blocks)

    @classmethod
    def from_target(cls, text_config: Any, arch: str = "dream", **overrides) -> DraftConfig:
        """Build from a HF text config (Llama, Mistral, Qwen2, Gemma3 ...): GQA and head_dim honoured."""
        g = (lambda k, d=None: text_config.get(k, d)) if isinstance(text_config, dict) else (
            lambda k, d=None: getattr(text_config, k, d))
        hidden, heads = g("hidden_size"), g("num_attention_heads")
        model_type = g("model_type", "") or ""
        rope = g("rope_parameters") or {}
        theta = g("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
        n_layers = g("num_hidden_layers")
        cfg = dict(
            hidden_size=hidden, num_heads=heads, num_kv_heads=g("num_key_value_heads") or heads,
            head_dim=g("head_dim") or hidden // heads, intermediate_size=g("intermediate_size"),
            vocab_size=g("vocab_size"), rms_norm_eps=g("rms_norm_eps", 1e-6) or 1e-6,
            norm_flavour="gemma_rms" if model_type.startswith("gemma") else "rms",
            hidden_act=g("hidden_act") or g("hidden_activation") or "silu", rope_theta=float(theta),
            final_logit_softcapping=g("final_logit_softcapping"), arch=arch, target_num_layers=n_layers,
        )
        if arch == "self-spec":
            cfg["exit_layer"] = default_exit_layer(n_layers)
        if arch == "eagle3":
            # low / middle / high layers, as EAGLE-3 taps them (hidden_states index = layer output)
            cfg["fuse_layers"] = [2, n_layers // 2, max(n_layers - 3, 1)]
        cfg.update(overrides)
        return cls(**cfg)

    def save(self, path: str | Path) -> None:
        """Write as `draft_config.json` inside directory `path`."""
        Path(path, "draft_config.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> DraftConfig:
        """Read `draft_config.json` from directory `path`."""
        return cls(**json.loads(Path(path, "draft_config.json").read_text()))
