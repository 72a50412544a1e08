"""DREAM draft (and the EAGLE-2 / EAGLE-3 style baselines) as torch modules with explicit caches.

One call signature serves training (whole sequences), the reference decoder (context pass, tree steps)
and ONNX export:

    out = draft(embeds, positions, self_mask, self_cache, cross_k, cross_v, cross_mask, prev_feat)

- `embeds` [B,T,H]: the target's input embeddings of the draft's tokens (image features spliced in).
- `positions` [B,T]: the draft's own RoPE positions (compacted when visual tokens are pruned).
- `self_mask` [B,T,P+T] bool: which cached (P) and new (T) rows each query sees (causal or ancestry).
- `self_cache`: per self-attention block, (k, v) [B,kv_heads,P,head_dim] or None.
- `cross_k`, `cross_v` [B,kv_heads,C,head_dim]: projected target features (see `cross_kv`); the
  cross-attention keys are already per-head RMS-normed, so the cache is append-only.
- `cross_mask` [B,T,C] bool: query i sees features of positions before its own (and, in a tree, the
  draft features of its ancestors). A learned null key is always visible, so no row is empty.
- `prev_feat` [B,T,H]: the feature of each query's predecessor (EAGLE baselines fuse it with the
  embedding; DREAM reads features through cross-attention instead). An EAGLE-3 draft's predecessor is
  either the target's fused taps or the draft's own feature: see `predecessor`, which exported graphs
  and the reference decoder apply before the call.

Returns a dict: `feature` (final-normed draft feature, fed to the target's LM head), `block0` (output
of the first block, the intermediate-supervision point) and `self_kv` (the new rows per block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dream_export.draft.config import DraftConfig
from dream_export.draft.head_map import HeadMappedSelfAttention
from dream_export.modeling.attention import (
    cache_segments,
    fused_qkv,
    graph_batch,
    group_mask,
    merge_heads,
    segmented_attention,
    split_heads,
)


class RMSNorm(nn.Module):
    """RMSNorm in the target family's flavour ("gemma_rms" scales by 1 + w)."""

    def __init__(self, dim: int, eps: float, flavour: str = "rms"):
        super().__init__()
        self.eps, self.offset = eps, flavour == "gemma_rms"
        self.weight = nn.Parameter(torch.zeros(dim) if self.offset else torch.ones(dim))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """`scale` multiplies the weight (an exported graph stores the product: one node fewer downstream)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        w = (1.0 + self.weight.float()) if self.offset else self.weight.float()
        return (x * (w if scale == 1.0 else w * scale)).to(dtype)


def _act(name: str):
    return {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[name]


class MLP(nn.Module):
    """Gated MLP (gate, up, down) as in Llama / Mistral / Qwen2 / Gemma."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # one joined gate|up projection in the graph (the weights are joined at trace time and stored
            # once): a draft step's matmuls are one row each, and a CPU graph pays per node
            n = self.gate_proj.out_features
            gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).split([n, n], -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B,1,T,D] for integer positions [B,T] (computed once per forward, shared by blocks)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    ang = positions.to(torch.float32)[:, None, :, None] * inv  # [B,1,T,D/2]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


class SelfAttention(nn.Module):
    """GQA self-attention with RoPE at the draft's own positions."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def forward(self, x, rot, hidden, cache, single: bool = False):
        """`hidden`: the grouped mask over (cache, new rows) from `group_mask`; `single`: x is one row."""
        c = self.cfg
        q, k, v = fused_qkv((self.q_proj, self.k_proj, self.v_proj), x, c.num_heads, c.num_kv_heads, c.head_dim, *rot,
                            q_scale=c.head_dim ** -0.5, single=single)
        segments, kv = cache_segments(cache, k, v)
        # cache sizes as traced shapes: an exported graph may read only a cache's used slots
        o = segmented_attention(q, segments, hidden, c.num_kv_heads, sizes=[sk.shape[2] for sk, _ in segments[:-1]])
        return self.o_proj(merge_heads(o, c.num_heads, c.head_dim, single)), kv


class SelfAttnBlock(nn.Module):
    """Pre-norm decoder block; block 0 takes the raw embedding stream (no input norm), as EAGLE does."""

    def __init__(self, cfg: DraftConfig, input_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_flavour) if input_norm else None
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_flavour)
        self.mlp = MLP(cfg)

    def forward(self, x, rot, hidden, cache, single: bool = False):
        h = self.input_layernorm(x) if self.input_layernorm is not None else x
        a, kv = self.self_attn(h, rot, hidden, cache, single)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class CrossAttnBlock(nn.Module):
    """Gated cross-attention to the target's final-norm features (Mllama style, tanh gates at 0).

    Per-head RMSNorm on Q and K, no RoPE (features carry no draft position). A learned null key/value
    is always visible: the first query of a sequence has no earlier target feature, and without it its
    softmax would spread over masked (future) keys.
    """

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, cfg.norm_flavour)
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.null_k = nn.Parameter(torch.zeros(cfg.num_kv_heads, 1, d))
        self.null_v = nn.Parameter(torch.zeros(cfg.num_kv_heads, 1, d))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, cfg.norm_flavour)
        self.mlp = MLP(cfg)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def kv(self, feats: torch.Tensor, single: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Project features [B,S,H] to cacheable (normed K, V), each [B,kv_heads,S,head_dim] (`single`: S is 1)."""
        c = self.cfg
        k = self._normed_heads(self.k_proj(feats), self.k_norm, c.num_kv_heads, single=single)
        return k, split_heads(self.v_proj(feats), c.num_kv_heads, c.head_dim, single)

    def _normed_heads(self, y: torch.Tensor, norm: RMSNorm, heads: int, scale: float = 1.0,
                      single: bool = False) -> torch.Tensor:
        """[B,T,heads·head_dim] → per-head RMS-normed [B,heads,T,head_dim] (`scale` rides on the weight).

        Normed before the head transpose: over the last dim either way, and ONNX Runtime fuses the norm
        into one node only there (after the transpose it stays six nodes per chain step).
        """
        d = self.cfg.head_dim
        y = norm(y.reshape(graph_batch(y), -1, heads, d), scale)
        return split_heads(y, heads, d, True) if single else y.transpose(1, 2)

    def hidden_mask(self, cross_mask: torch.Tensor) -> torch.Tensor:
        """Visibility [B,T,C] → the grouped hidden-key mask over (null key, features) that `forward` takes."""
        c = self.cfg
        null_visible = torch.ones_like(cross_mask[..., :1]) if c.null_key else ~cross_mask.any(-1, keepdim=True)
        return group_mask(torch.cat([null_visible, cross_mask], -1), c.num_heads // c.num_kv_heads)

    def forward(self, x, cross_k, cross_v, hidden, single: bool = False):
        """`cross_k`/`cross_v`: one tensor, or a tuple of segments (cache, new rows) read without copying;
        `hidden`: from `hidden_mask`; `single`: x is one row."""
        c = self.cfg
        b = graph_batch(x)
        # the attention scale rides on q_norm's weight
        q = self._normed_heads(self.q_proj(self.input_layernorm(x)), self.q_norm, c.num_heads, c.head_dim ** -0.5,
                               single)
        ks = cross_k if isinstance(cross_k, (tuple, list)) else (cross_k,)
        vs = cross_v if isinstance(cross_v, (tuple, list)) else (cross_v,)
        segments = [(self.null_k.expand(b, -1, -1, -1).to(q.dtype), self.null_v.expand(b, -1, -1, -1).to(q.dtype)),
                    *zip(ks, vs, strict=True)]
        o = segmented_attention(q, segments, hidden, c.num_kv_heads, sizes=[sk.shape[2] for sk, _ in segments[:-1]])
        x = x + torch.tanh(self.attn_gate) * self.o_proj(merge_heads(o, c.num_heads, c.head_dim, single))
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.post_attention_layernorm(x))


class Draft(nn.Module):
    """A draft model: DREAM (3 blocks with gated cross-attention) or an EAGLE-2/3 style baseline."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        if cfg.arch == "eagle3":
            self.fuse = nn.Linear(h * len(cfg.fuse_layers), h, bias=False)
        if cfg.arch in ("eagle2", "eagle3"):
            self.fc = nn.Linear(2 * h, h, bias=False)
            self.blocks = nn.ModuleList([SelfAttnBlock(cfg, input_norm=False)])
            self.cross = None
        else:
            self.blocks = nn.ModuleList([SelfAttnBlock(cfg, input_norm=False), SelfAttnBlock(cfg, input_norm=True)])
            self.cross = CrossAttnBlock(cfg) if cfg.cross_attention else None
        if cfg.last_block_heads is not None:  # a sub-network of a supernet: the last block's heads pruned
            self.blocks[-1].self_attn = HeadMappedSelfAttention(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps, cfg.norm_flavour)

    @property
    def uses_cross(self) -> bool:
        return self.cross is not None

    def target_feature(self, final: torch.Tensor, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The per-position target feature this draft consumes (EAGLE-3: fused low/mid/high taps)."""
        if self.config.arch == "eagle3":
            return self.fuse(torch.cat(taps, -1))
        return final

    def predecessor(self, prev_feat: torch.Tensor, prev_taps: torch.Tensor | None) -> torch.Tensor:
        """The predecessor feature [B,T,H] a call reads: `prev_feat` (the draft's own feature, or a target
        feature of this width) plus, for EAGLE-3, the fused target taps `prev_taps` [B,T,taps·H].

        A row's predecessor is a target position (context pass: its taps) or a draft node (tree and chain
        steps: its feature); the fuse is a bias-free linear map, so the caller feeds zeros to whichever
        of the two the row lacks and the sum is exact.
        """
        if self.config.arch != "eagle3" or prev_taps is None:
            return prev_feat
        return prev_feat + self.fuse(prev_taps.to(prev_feat.dtype))

    def cross_kv(self, feats: torch.Tensor, single: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Cacheable cross-attention K/V of features [B,S,H] (empty tensors for drafts without it)."""
        if self.cross is None:
            b, s, _ = feats.shape
            z = feats.new_zeros(b, self.config.num_kv_heads, s, self.config.head_dim)
            return z, z
        return self.cross.kv(feats, single)

    def forward(self, embeds, positions, self_mask, self_cache=None, cross_k=None, cross_v=None,
                cross_mask=None, prev_feat=None) -> dict:
        rot = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        # masks inverted and tiled for grouped queries once, shared by the blocks
        hidden = group_mask(self_mask, self.config.num_heads // self.config.num_kv_heads)
        cross_hidden = self.cross.hidden_mask(cross_mask) if self.cross is not None else None
        return self.step(embeds, rot, hidden, self_cache, cross_k, cross_v, cross_hidden, prev_feat)

    def step(self, embeds, rot, hidden, self_cache=None, cross_k=None, cross_v=None, cross_hidden=None,
             prev_feat=None, single: bool = False) -> dict:
        """`forward` with the rotary tables and hidden-key masks already made (a chain graph makes every
        step's at once); `single`: one query row, known when tracing (head splits become reshapes)."""
        x = embeds
        if self.config.arch != "dream":
            x = self.fc(torch.cat([embeds, prev_feat.to(embeds.dtype)], -1))
        caches = self_cache or [None] * len(self.blocks)
        x, kv0 = self.blocks[0](x, rot, hidden, caches[0], single)
        block0, new_kv = x, [kv0]
        if self.cross is not None:
            x = self.cross(x, cross_k, cross_v, cross_hidden, single)
        for blk, cache in zip(self.blocks[1:], caches[1:], strict=True):
            x, kv = blk(x, rot, hidden, cache, single)
            new_kv.append(kv)
        return {"feature": self.norm(x), "block0": block0, "self_kv": new_kv}


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final-logit soft-capping (Gemma 2/3); identity when the family has none."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def init_weights(model: Draft, std: float | None = None) -> None:
    """Small normal init for linears (the gates and norms keep their identity initialisation)."""
    std = std or 1.0 / math.sqrt(model.config.hidden_size)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
