"""Self-speculative draft: the target's own first K decoder layers plus a small imitation network.

The draft runs the target's layers 1..K (the very modules, so its weights are shared, never copied)
on the same token stream the target sees, then one or two decoder blocks (the imitation network)
trained to map the layer-K hidden states to the target's final-norm features, which the target's own
LM head reads out. It takes the DREAM draft's call signature (see `draft/model.py`), so training,
the torch reference decoder, the exported `draft` graph and the runtime's drafters take it as they
are: its self-attention cache has K + m blocks (the K shared layers first), and it reads no target
features (no cross-attention, no predecessor feature).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dream_export.draft.config import DraftConfig
from dream_export.draft.model import RMSNorm, SelfAttnBlock
from dream_export.errors import IncompatibleArtifactError
from dream_export.modeling.attention import group_mask
from dream_export.modeling.decoder import TargetDecoder

# Keys of the shared target layers in a state dict: never saved with the draft (they are the target's).
_SHARED = "prefix."


class SelfSpecDraft(nn.Module):
    """The target's first `config.exit_layer` layers (through `decoder`) + the imitation blocks + a norm."""

    def __init__(self, cfg: DraftConfig, decoder: TargetDecoder):
        super().__init__()
        self.config = cfg
        # registered so an exported graph stores these layers' weights as initializers (the exporter then
        # points them at the target graph's copy); left out of `state_dict`, frozen
        self.prefix = decoder
        for p in decoder.parameters():
            p.requires_grad_(False)
        self.imitation = nn.ModuleList([SelfAttnBlock(cfg, input_norm=True) for _ in range(cfg.imitation_blocks)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_flavour)
        self.cross = None
        # training: the inputs are already the layer-K states (see `train_selfspec`), the shared layers skipped
        self.exit_states_in = False

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        """Every block holding a self-attention cache, in cache order: the shared layers, then imitation."""
        return (*self.prefix.lm.layers[: self.config.exit_layer], *self.imitation)

    @property
    def uses_cross(self) -> bool:
        return False

    def target_feature(self, final: torch.Tensor, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        return final

    def predecessor(self, prev_feat: torch.Tensor, prev_taps: torch.Tensor | None) -> torch.Tensor:
        """No predecessor feature is read (`Draft.predecessor`'s signature)."""
        return prev_feat

    def cross_kv(self, feats: torch.Tensor, single: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """No cross-attention: empty K/V, as the EAGLE-style drafts return."""
        b, s, _ = feats.shape
        z = feats.new_zeros(b, self.config.num_kv_heads, s, self.config.head_dim)
        return z, z

    def init_from_target(self) -> None:
        """Start as an early exit: each imitation block a copy of the target layer that would follow the
        exit (the names match Llama-style layers), the norm a copy of the target's final norm."""
        layers, k = self.prefix.lm.layers, self.config.exit_layer
        for i, blk in enumerate(self.imitation):
            src = layers[min(k + i, len(layers) - 1)].state_dict()
            own = blk.state_dict()
            blk.load_state_dict({n: src[n].to(v.dtype) if n in src and src[n].shape == v.shape else v
                                 for n, v in own.items()})
        self.norm.weight.data.copy_(self.prefix.lm.norm.weight.detach().float())

    def forward(self, embeds, positions, self_mask, self_cache=None, cross_k=None, cross_v=None,
                cross_mask=None, prev_feat=None) -> dict:
        """The DREAM draft's signature (cross inputs and `prev_feat` unused); returns `feature` (the
        predicted final-norm feature), `block0` (the layer-K state) and `self_kv` (K + m new row pairs)."""
        k_exit = self.config.exit_layer
        rot = self.prefix.rotary(embeds, positions)
        hidden = group_mask(self_mask, self.config.num_heads // self.config.num_kv_heads)
        caches = self_cache or [None] * (k_exit + len(self.imitation))
        x, new_kv = embeds, []
        for i in range(0 if self.exit_states_in else k_exit):
            x, kv, _ = self.prefix.layer(i, x, rot, caches[i], hidden)
            new_kv.append(kv)
        exit_state = x
        for blk, cache in zip(self.imitation, caches[k_exit:], strict=True):
            x, kv = blk(x, rot, hidden, cache)
            new_kv.append(kv)
        return {"feature": self.norm(x), "block0": exit_state, "self_kv": new_kv}

    def state_dict(self, *args, **kwargs):
        """The imitation network's weights only (the shared layers belong to the target)."""
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if k.startswith(_SHARED)]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the imitation network's weights; the shared layers are the target's and stay as they are."""
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in res.missing_keys if not k.startswith(_SHARED)]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"self-spec weights do not match: missing {missing[:3]}, "
                               f"unexpected {res.unexpected_keys[:3]}")
        return res


def new_selfspec(cfg: DraftConfig, decoder: TargetDecoder) -> SelfSpecDraft:
    """An untrained self-spec draft around the target's `decoder`, initialised as an early exit."""
    draft = SelfSpecDraft(cfg, decoder)
    draft.init_from_target()
    return draft


def load_selfspec(path: str | Path, cfg: DraftConfig, decoder: TargetDecoder | None) -> SelfSpecDraft:
    """A saved self-spec draft bound to its target's `decoder` (required: the draft runs its layers)."""
    from safetensors.torch import load_file

    if decoder is None:
        raise IncompatibleArtifactError(f"{path} is a self-spec draft: it runs its target's first layers, so "
                                        "load it together with the target")
    if decoder.n_layers != cfg.target_num_layers:
        raise IncompatibleArtifactError(f"{path} was trained for a {cfg.target_num_layers}-layer target; this "
                                        f"target has {decoder.n_layers} layers")
    draft = SelfSpecDraft(cfg, decoder)
    try:
        draft.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    except RuntimeError as e:
        raise IncompatibleArtifactError(f"{path}: {e}") from e
    return draft.eval()
