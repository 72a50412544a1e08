"""Attention over several key/value segments without concatenating the caches.

A runtime-owned cache enters a graph as its own input; concatenating it with the new rows would copy
the whole cache on every call. Scoring each segment separately and joining only the (small) score
matrices keeps per-call work proportional to the new rows plus one read of the cache. GQA is handled
by grouping query heads under their KV head instead of repeating K/V.

Shapes are written so that the exported graphs carry no shape arithmetic: every reshape names its
sizes as constants and at most one `-1` (the token count), and the batch is the graphs' fixed 1 while
exporting. On ONNX Runtime CPU each Shape/Gather/Concat node costs about as much as a small MatMul,
so a graph full of them is bound by per-node overhead, not by arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn


def graph_batch(x: torch.Tensor) -> int:
    """The batch size to write into reshapes: the exported graphs' fixed 1, else the tensor's own."""
    return 1 if torch.onnx.is_in_onnx_export() else x.shape[0]


def split_heads(x: torch.Tensor, heads: int, head_dim: int, single: bool = False) -> torch.Tensor:
    """[B,T,heads·head_dim] → [B,heads,T,head_dim].

    `single`: the caller knows T is 1 (a chain graph's draft step), so the head transpose is a reshape
    (a graph with dynamic T cannot tell; one node less per split where every node costs).
    """
    if single:
        return x.reshape(graph_batch(x), heads, 1, head_dim)
    return x.reshape(graph_batch(x), -1, heads, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor, heads: int, head_dim: int, single: bool = False) -> torch.Tensor:
    """[B,heads,T,head_dim] → [B,T,heads·head_dim] (`single`: T is 1, as in `split_heads`)."""
    if single:
        return x.reshape(graph_batch(x), 1, heads * head_dim)
    return x.transpose(1, 2).reshape(graph_batch(x), -1, heads * head_dim)


def group_mask(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """Visibility [B,T,S] bool → hidden-key mask [B,1,rep·T,S] for grouped queries (True = masked).

    Computed once per forward and shared by every layer, so the graphs invert and tile it once.
    """
    return (~mask).repeat(1, rep, 1)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate-half: [x1, x2] → [-x2, x1] over the last dim (one Split node in the graph)."""
    x1, x2 = x.split(int(x.shape[-1]) // 2, -1)
    return torch.cat([-x2, x1], -1)


def joined_qkv(projs: tuple[nn.Linear, nn.Linear, nn.Linear], q_scale: float = 1.0,
               qk_norms: tuple[nn.Module, nn.Module] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The joined Q/K/V weight and bias of `fused_qkv` (Q's rows times the scale unless Q is normed): the
    ones `join_qkv` stored on the Q projection, else built from the three."""
    joined = getattr(projs[0], "joined_qkv", None)
    if joined is not None:
        return joined.weight, joined.bias
    fold = q_scale if qk_norms is None else 1.0
    w = torch.cat([projs[0].weight * fold, projs[1].weight, projs[2].weight])
    bias = (torch.cat([projs[0].bias * fold, projs[1].bias, projs[2].bias])
            if projs[0].bias is not None else None)
    return w, bias


def join_qkv(projs: tuple[nn.Linear, nn.Linear, nn.Linear], q_scale: float = 1.0,
             qk_norms: tuple[nn.Module, nn.Module] | None = None) -> None:
    """Join the Q/K/V weights once, in place, for exporting: the joined tensor becomes the Q projection's
    `joined_qkv` (which `fused_qkv` then uses) and the three separate weights are freed.

    Joined at trace time instead, the exporter's constant folding would hold the joined copy beside the
    three originals until the graph is written: about a third more memory on a Llama decoder. The
    values are the same either way (the same fp32 multiply and concatenation), so is the graph.
    After this the projections no longer run on their own: only `fused_qkv` computes them.
    """
    with torch.no_grad():
        w, bias = joined_qkv(projs, q_scale, qk_norms)
        joined = nn.Module()
        joined.weight = nn.Parameter(w, requires_grad=False)
        joined.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        for p in projs:
            p.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
            if p.bias is not None:
                p.bias = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        projs[0].joined_qkv = joined


def fused_qkv(projs: tuple[nn.Linear, nn.Linear, nn.Linear], h: torch.Tensor, heads: int, kv_heads: int,
              head_dim: int, cos: torch.Tensor, sin: torch.Tensor, q_scale: float = 1.0, single: bool = False,
              qk_norms: tuple[nn.Module, nn.Module] | None = None):
    """Q (times `q_scale`), K (rotary applied to both) and V [B,heads,T,D] from one joined projection.

    One MatMul, one head split and one rotary pass over Q and K together instead of three of each: on
    CPU a graph's cost is mostly per-node overhead. The weights are joined (and Q's attention scale
    folded in: RoPE is linear) at trace time, so the exported graph stores the result once, constant-folded.
    `qk_norms` (Gemma3): per-head norms of Q and K before RoPE; a norm undoes any scale folded into the
    weights, so Q is scaled after RoPE instead.
    """
    w, bias = joined_qkv(projs, q_scale, qk_norms)
    y = split_heads(nn.functional.linear(h, w, bias), heads + 2 * kv_heads, head_dim, single)
    qk, v = y.split([heads + kv_heads, kv_heads], 1)
    if qk_norms is not None:
        q, k = qk.split([heads, kv_heads], 1)
        qk = torch.cat([qk_norms[0](q), qk_norms[1](k)], 1)
    qk = (qk * cos + rotate_half(qk) * sin).to(qk.dtype)
    q, k = qk.split([heads, kv_heads], 1)
    if qk_norms is not None and q_scale != 1.0:
        q = q * q_scale
    return q, k, v


def cache_segments(cache, k: torch.Tensor, v: torch.Tensor):
    """Key/value segments of a self-attention call: (segments, (k, v) to return as the new rows).

    `cache`: None, one (k, v) segment, or a list (cache + a chain graph's in-graph rows). In-graph rows
    and the new ones form one segment (attention allows one of variable size, the last), and that merged
    segment is what a list cache gets back: the next chain step's in-graph rows, without a copy more.
    """
    if isinstance(cache, list):
        *fixed, (rk, rv) = cache
        k, v = torch.cat([rk, k], 2), torch.cat([rv, v], 2)
        return [*fixed, (k, v)], (k, v)
    return ([(k, v)] if cache is None else [cache, (k, v)]), (k, v)


def static_len(x: torch.Tensor, dim: int) -> int:
    """A size that is fixed in the exported graph (a cache capacity), as a constant rather than a Shape op."""
    return int(x.shape[dim])


def segmented_attention(q: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor,
                        kv_heads: int, scale: float = 1.0, return_probs: bool = False, sizes: list | None = None):
    """softmax(q·Kᵀ·scale + mask) · V over concatenated key/value segments, computed per segment.

    q [B,H,T,D]; segments (k [B,KV,S,D], v [B,KV,S,D]); `hidden` [B,1,rep·T,ΣS] bool from `group_mask`
    over all segments' keys. Every segment but the last must have a size fixed in the graph (a cache),
    unless `sizes` gives those sizes (a traced size makes the split point dynamic).
    Returns out [B,H,T,D] (and the probabilities in grouped layout [B,KV,rep·T,ΣS] when asked; row
    r·T + t is query t of head kv·rep + r).
    """
    b, h, d = graph_batch(q), int(q.shape[1]), int(q.shape[-1])
    qg = (q if scale == 1.0 else q * scale).reshape(b, kv_heads, -1, d)  # head h = kv_head·rep + r
    scores = [qg @ k.transpose(-1, -2) for k, _v in segments]
    scores = torch.cat(scores, -1) if len(scores) > 1 else scores[0]
    probs = torch.softmax(scores.masked_fill(hidden, torch.finfo(q.dtype).min), -1)
    out, start = None, 0
    for i, (k, v) in enumerate(segments):
        if i + 1 < len(segments):
            size = sizes[i] if sizes is not None else static_len(k, 2)
            p = probs[..., start:start + size]
            start += size
        else:
            p = probs[..., start:]
        o = p @ v
        out = o if out is None else out + o
    out = out.reshape(b, h, -1, d)
    return (out, probs) if return_probs else out
