"""The target's decoder as a pure function of (embeddings, positions, mask, KV cache).

The same module is the ground truth of the torch reference decoder, the producer of draft training
data and the body of the exported target graph, so all three agree by construction. It reuses the HF
model's own sub-modules (projections, norms, MLP, rotary embedding) and re-implements only the
attention bookkeeping: an explicit runtime-owned cache and an arbitrary boolean mask (causal prefill
or tree ancestry), which HF's cache classes do not express portably.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dream_export.modeling.attention import fused_qkv, group_mask, join_qkv, merge_heads, segmented_attention


@dataclass(frozen=True)
class DecoderLayout:
    """How a family's decoder blocks compute, beyond the Llama block (the family adapter fills it in).

    layer_types:    "full_attention" / "sliding_attention" per layer.
    sliding_window: keys a sliding layer sees: query position − key position < window.
    attention_scale: the factor QKᵀ is multiplied by (Gemma3: query_pre_attn_scalar**-0.5).
    qk_norm:        per-head norms on Q and K before RoPE (Gemma3).
    sandwich_norm:  the attention output and the MLP are normed before their residual add, and the MLP
                    input by `pre_feedforward_layernorm` (Gemma3; in Llama blocks `post_attention_layernorm`
                    is the MLP's input norm instead).
    rope_by_layer_type: the rotary module takes the layer type (Gemma3: a local base for sliding layers).
    """

    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    attention_scale: float | None = None  # None: head_dim**-0.5
    qk_norm: bool = False
    sandwich_norm: bool = False
    rope_by_layer_type: bool = False
    mrope: bool = False  # 3-D (temporal, height, width) positions: [3,T] in the graph, [3,B,T] in torch


class TargetDecoder(nn.Module):
    """Explicit-KV forward over a HF decoder stack: Llama blocks, or what `layout` says differs.

    forward(inputs_embeds [B,T,H], position_ids [B,T] (mRoPE: [3,B,T]), mask [B,T,P+T] bool,
            past_k, past_v [L,B,kv_heads,P,head_dim]) -> dict with
      hidden   [B,T,H]    final-norm hidden states (the draft's features)
      new_k/v  [L,B,kv_heads,T,head_dim]  this call's KV rows (the runtime places them)
      taps     list of [B,T,H] hidden states after the requested layers (hidden_states[i] numbering)
      attn     (when requested) list of per-layer attention probabilities [B,heads,T,P+T]
      attn_grouped  (when requested) the last layer's probabilities in grouped layout [B,KV,rep·T,P+T],
               which export without shape arithmetic
    """

    def __init__(self, language_model: nn.Module, taps: tuple[int, ...] = (), layout: DecoderLayout | None = None):
        super().__init__()
        self.lm = language_model
        cfg = language_model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.layout = layout or DecoderLayout(("full_attention",) * self.n_layers)
        self.scale = self.layout.attention_scale or self.head_dim**-0.5
        self.taps = tuple(taps)

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """(cos, sin) [B,1,T,D] per layer type; position_ids [B,T], or for mRoPE [3,B,T] or the graph's [3,T]
        (the HF rotary module lays the three axes out over the frequency sections)."""
        if self.layout.mrope and position_ids.dim() == 2:
            position_ids = position_ids[:, None]
        out = {}
        for kind in dict.fromkeys(self.layout.layer_types):
            args = (kind,) if self.layout.rope_by_layer_type else ()
            cos, sin = self.lm.rotary_emb(x, position_ids, *args)
            out[kind] = (cos[:, None], sin[:, None])
        return out

    def _window_hidden(self, hidden: torch.Tensor, position_ids: torch.Tensor, used) -> torch.Tensor:
        """The grouped hidden-key mask of sliding layers: also keys `window` or more positions back.

        Cache slot j holds position j (prefill positions run 0..n-1 and commits are contiguous); the
        new rows are at `position_ids`. Positions, not row indices, decide: a tree node sees the
        ancestors HF's one-token-at-a-time decoding would see along its path."""
        pos = position_ids.reshape(-1)
        keys = torch.cat([torch.arange(used, device=pos.device), pos])
        far = (pos[:, None] - keys[None, :]) >= self.layout.sliding_window
        return hidden | far.repeat(self.n_heads // self.n_kv, 1)[None, None]

    def forward(self, inputs_embeds, position_ids, mask, past_k, past_v, output_attentions: bool = False,
                output_hidden_states: bool = False) -> dict:
        x = inputs_embeds
        lay = self.layout
        rope = self._rope(x, position_ids)
        # A mask narrower than cache + new rows reads only the cache's first slots: attention then costs
        # what the context holds, not what the cache could hold.
        used = mask.shape[-1] - x.shape[1]
        past_k, past_v = past_k[:, :, :, :used], past_v[:, :, :, :used]
        # the mask is inverted and tiled for grouped queries once, not in every layer
        hidden = {"full_attention": group_mask(mask, self.n_heads // self.n_kv)}
        if "sliding_attention" in lay.layer_types:
            hidden["sliding_attention"] = (self._window_hidden(hidden["full_attention"], position_ids, used)
                                           if lay.sliding_window else hidden["full_attention"])
        new_k, new_v, attns, hidden_states, taps = [], [], [], [x], []
        for i in range(self.n_layers):
            kind = lay.layer_types[i]
            x, (k, v), probs = self.layer(i, x, rope[kind], (past_k[i], past_v[i]), hidden[kind], used)
            new_k.append(k)
            new_v.append(v)
            if output_attentions:
                attns.append(probs)
            hidden_states.append(x)
            if i + 1 in self.taps:
                taps.append(x)
        out = {"hidden": self.lm.norm(x), "new_k": torch.stack(new_k), "new_v": torch.stack(new_v), "taps": taps}
        if output_attentions:
            out["attn"] = [per_head(p, self.n_heads) for p in attns]
            out["attn_grouped"] = attns[-1]
        if output_hidden_states:
            out["hidden_states"] = hidden_states
        return out

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables [B,1,T,head_dim] of the first layer's kind for `position_ids` [B,T]."""
        return self._rope(x, position_ids)[self.layout.layer_types[0]]

    def layer(self, i: int, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor],
              cache: tuple[torch.Tensor, torch.Tensor] | None, hidden: torch.Tensor, used: int | None = None):
        """Decoder layer `i` over `x` [B,T,H] with cached rows `cache` (or none) → (x, (k, v) new rows,
        grouped attention probabilities). `rot`: the rotary tables of the layer's kind; `hidden`: the grouped
        mask from `group_mask` over cache + new rows (with the window of a sliding layer); `used`: the cache's
        (traced) size. Self-speculative drafts run the first layers through this very code, so their exported
        weights are byte-identical to the target graph's."""
        lay, layer = self.layout, self.lm.layers[i]
        at = layer.self_attn
        q, k, v = fused_qkv((at.q_proj, at.k_proj, at.v_proj), layer.input_layernorm(x), self.n_heads, self.n_kv,
                            self.head_dim, *rot, q_scale=self.scale, qk_norms=self._qk_norms(at))
        segments = [(k, v)] if cache is None else [cache, (k, v)]
        sizes = None if cache is None else [cache[0].shape[2] if used is None else used]
        o, probs = segmented_attention(q, segments, hidden, self.n_kv, return_probs=True, sizes=sizes)
        a = at.o_proj(merge_heads(o, self.n_heads, self.head_dim))
        if lay.sandwich_norm:
            x = x + layer.post_attention_layernorm(a)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        else:
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, (k, v), probs

    def _qk_norms(self, attn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        return (attn.q_norm, attn.k_norm) if self.layout.qk_norm else None

    def join_qkv(self) -> None:
        """Join every layer's Q/K/V weights once (`attention.join_qkv`), for exporting: the exporter then
        holds no second copy of them. The HF attention modules no longer run on their own afterwards."""
        for layer in self.lm.layers:
            at = layer.self_attn
            join_qkv((at.q_proj, at.k_proj, at.v_proj), self.scale, self._qk_norms(at))

    def empty_cache(self, batch: int = 1, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-length past K/V for a first (prefill) call."""
        z = torch.zeros(self.n_layers, batch, self.n_kv, 0, self.head_dim, dtype=dtype)
        return z, z.clone()


def per_head(probs: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-layout probabilities [B,KV,rep·T,S] → [B,heads,T,S]."""
    b, kv, rows, s = probs.shape
    return probs.reshape(b, kv, heads // kv, rows * kv // heads, s).flatten(1, 2)


def causal_mask(t: int, past: int = 0, device=None) -> torch.Tensor:
    """[1,T,past+T] bool: every query sees the whole past and the new rows up to itself."""
    m = torch.ones(t, past + t, dtype=torch.bool, device=device)
    m[:, past:] = torch.tril(torch.ones(t, t, dtype=torch.bool, device=device))
    return m[None]
