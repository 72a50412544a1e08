"""Self-attention whose query heads were pruned: each kept query head names the KV head it reads.

A DREAM-S sub-network keeps the best-ranked query heads of the draft's last block. Pruning query heads
out of grouped-query attention can leave the groups uneven (3 of 4 heads over 2 KV heads: 2 + 1), which
the grouped layout of `segmented_attention` cannot express, so each KV head's group is attended
separately. Keys and values keep every KV head: the draft's caches keep their layout, and a sub-network
runs in a runtime built for the full draft.
"""

from __future__ import annotations

from itertools import groupby

import torch
from torch import nn

from dream_export.draft.config import DraftConfig
from dream_export.modeling.attention import cache_segments, fused_qkv, merge_heads, segmented_attention


class HeadMappedSelfAttention(nn.Module):
    """GQA self-attention with RoPE over `cfg.last_block_heads` query heads (sorted by their KV head)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        heads = list(cfg.last_block_heads or [])
        if not heads or heads != sorted(heads) or not all(0 <= g < cfg.num_kv_heads for g in heads):
            raise ValueError(f"last_block_heads must list KV heads (0..{cfg.num_kv_heads - 1}) in order, got {heads}")
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, len(heads) * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(len(heads) * d, h, bias=False)
        # (KV head, first query head, query heads) per non-empty group, as Python ints: static in a graph
        self.groups, start = [], 0
        for g, members in groupby(heads):
            n = len(list(members))
            self.groups.append((g, start, n))
            start += n

    def forward(self, x, rot, hidden, cache, single: bool = False):
        """As `SelfAttention.forward`; `hidden` is the full draft's grouped mask (its first n·T rows are the
        mask of a group of n query heads)."""
        c = self.cfg
        n = len(c.last_block_heads)
        q, k, v = fused_qkv((self.q_proj, self.k_proj, self.v_proj), x, n, c.num_kv_heads, c.head_dim, *rot,
                            q_scale=c.head_dim ** -0.5, single=single)
        segments, kv = cache_segments(cache, k, v)
        sizes = [sk.shape[2] for sk, _ in segments[:-1]]
        rep, t = c.num_heads // c.num_kv_heads, q.shape[2]
        outs = []
        for g, start, count in self.groups:
            seg = [(sk[:, g:g + 1], sv[:, g:g + 1]) for sk, sv in segments]
            mask = hidden if count == rep else hidden[:, :, :count * t]
            outs.append(segmented_attention(q[:, start:start + count], seg, mask, 1, sizes=sizes))
        o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return self.o_proj(merge_heads(o, n, c.head_dim, single)), kv
