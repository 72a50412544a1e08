"""Attention over several key/value segments without concatenating the caches.

A runtime-owned cache enters a graph as its own input; concatenating it with the new rows would copy
the whole cache on every call. Scoring each segment separately and joining only the (small) score
matrices keeps per-call work proportional to the new rows plus one read of the cache. GQA is handled
by grouping query heads under their KV head instead of repeating K/V.
"""

from __future__ import annotations

import math

import torch


def segmented_attention(q: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        scale: float | None = None, return_probs: bool = False):
    """softmax(q·Kᵀ·scale + mask) · V over concatenated segments, computed per segment.

    q [B,H,T,D]; each segment (k [B,KV,S,D], v [B,KV,S,D], mask [B,T,S] bool, True = visible).
    Returns out [B,H,T,D] (and the probabilities [B,H,T,ΣS] when asked).
    """
    b, h, t, d = q.shape
    kv = segments[0][0].shape[1]
    rep = h // kv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qg = (q * scale).reshape(b, kv, rep * t, d)  # head h = kv_head * rep + r, as repeat_interleave
    neg = torch.finfo(q.dtype).min
    scores, sizes = [], []
    for k, _v, m in segments:
        s = (qg @ k.transpose(-1, -2)).reshape(b, h, t, k.shape[2])
        scores.append(s.masked_fill(~m[:, None], neg))
        sizes.append(k.shape[2])
    probs = torch.softmax(torch.cat(scores, -1), -1)
    out = None
    for p, (_k, v, _m) in zip(torch.split(probs, sizes, -1), segments, strict=True):
        o = p.reshape(b, kv, rep * t, p.shape[-1]) @ v
        out = o if out is None else out + o
    out = out.reshape(b, h, t, d)
    return (out, probs) if return_probs else out
