"""Reference draft–verify decoding in torch: the ground truth the exported runtime is checked against.

Readable over speed: caches grow by concatenation, the target verifies a whole tree per round with
an ancestor mask, and the accepted rows are committed by compaction (gathering the accepted path's
KV rows). Tree logic and acceptance are the runtime's own numpy code, so both paths share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dream_export.draft.model import Draft, soft_cap
from dream_export.modeling.decoder import TargetDecoder, causal_mask
from dream_export.runtime.accept import (
    SamplingParams,
    accept_greedy,
    accept_sampling,
    probs_from_logits,
    sample,
)
from dream_export.runtime.tree import TreeDraft, TreeSpec, draft_step_masks


@dataclass
class TargetSide:
    """What decoding needs of the target: the explicit-KV decoder, its embedding table and LM head."""

    decoder: TargetDecoder
    embed_tokens: torch.nn.Module
    lm_head: torch.nn.Module
    embed_scale: float = 1.0
    softcap: float | None = None

    def embed(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).view(1, -1)
        return self.embed_tokens(ids) * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.lm_head(hidden), self.softcap)


@dataclass
class GenResult:
    """Generated tokens and speculation statistics."""

    tokens: list[int]
    accepted: list[int] = field(default_factory=list)  # tokens gained per target pass (drafts + bonus)
    finish_reason: str = "length"

    @property
    def tau(self) -> float:
        return float(np.mean(self.accepted)) if self.accepted else 0.0


class _DraftState:
    """The draft's committed caches and the tokens it has not yet seen."""

    def __init__(self, draft: Draft):
        self.draft = draft
        cfg = draft.config
        z = torch.zeros(1, cfg.num_kv_heads, 0, cfg.head_dim)
        self.self_cache = [(z, z) for _ in draft.blocks]
        self.cross_k, self.cross_v = z, z
        # per target position, what the draft consumes: the final feature, or EAGLE-3's concatenated taps
        # (fused by the draft at each call, as the exported graph does)
        self.taps = cfg.arch == "eagle3"
        self.feats = torch.zeros(0, cfg.hidden_size * (len(cfg.fuse_layers) if self.taps else 1))
        self.next_pos = 0  # the draft's own (compacted) position counter
        self.pending: list[tuple[int, torch.Tensor]] = []  # (original position, embedding [H])

    def add_features(self, feats: torch.Tensor) -> None:
        if self.draft.uses_cross:
            k, v = self.draft.cross_kv(feats[None])
            self.cross_k, self.cross_v = torch.cat([self.cross_k, k], 2), torch.cat([self.cross_v, v], 2)
        self.feats = torch.cat([self.feats, feats], 0)

    def prev_feat(self, orig: list[int]) -> torch.Tensor:
        zero = torch.zeros(self.feats.shape[1])
        return torch.stack([self.feats[o - 1] if o > 0 else zero for o in orig])[None]

    def context_pass(self) -> dict:
        """Run the pending tokens (causal, seeing target features before each one's position)."""
        orig = [o for o, _ in self.pending]
        emb = torch.stack([e for _, e in self.pending])[None]
        t, past = len(orig), self.self_cache[0][0].shape[2]
        pos = torch.arange(self.next_pos, self.next_pos + t)[None]
        cross_mask = (torch.arange(self.feats.shape[0])[None, :] < torch.tensor(orig)[:, None])[None]
        prev = self.prev_feat(orig)  # every pending token's predecessor is a target position
        if self.taps:
            prev = self.draft.predecessor(torch.zeros(1, t, self.draft.config.hidden_size), prev)
        out = self.draft(emb, pos, causal_mask(t, past), self.self_cache, self.cross_k, self.cross_v, cross_mask, prev)
        self.self_cache = [(torch.cat([c[0], kv[0]], 2), torch.cat([c[1], kv[1]], 2))
                           for c, kv in zip(self.self_cache, out["self_kv"], strict=True)]
        self.next_pos += t
        self.pending = []
        return out


@torch.no_grad()
def draft_tree(state: _DraftState, target: TargetSide, spec: TreeSpec, root: int) -> TreeDraft:
    """One round of EAGLE-2 tree drafting; the draft's tree-phase rows are scratch and discarded."""
    draft = state.draft
    out = state.context_pass()
    root_feat = out["feature"][:, -1:]
    tree = TreeDraft(spec, root)
    lp = torch.log_softmax(target.logits(root_feat[0]).float(), -1)
    top = torch.topk(lp, spec.k, -1)
    frontier = tree.expand(top.indices.numpy(), top.values.numpy())
    scratch_self = [(kv[0][:, :, :0], kv[1][:, :, :0]) for kv in state.self_cache]
    scratch_k, scratch_v = draft.cross_kv(root_feat)
    scratch_feats = root_feat[0]
    run_slot: dict[int, int] = {}
    feat_slot = {0: 0}
    root_pos = state.next_pos - 1
    for _ in range(spec.depth - 1):
        base = scratch_self[0][0].shape[2]
        for r, node in enumerate(frontier):
            run_slot[node] = base + r
        sm, cm = draft_step_masks(tree, frontier, run_slot, feat_slot, base + len(frontier), scratch_feats.shape[0])
        f = len(frontier)
        committed_self = state.self_cache[0][0].shape[2]
        self_mask = torch.cat([torch.ones(f, committed_self, dtype=torch.bool), torch.from_numpy(sm)], 1)[None]
        cross_mask = torch.cat([torch.ones(f, state.feats.shape[0], dtype=torch.bool), torch.from_numpy(cm)], 1)[None]
        caches = [(torch.cat([c[0], s[0]], 2), torch.cat([c[1], s[1]], 2))
                  for c, s in zip(state.self_cache, scratch_self, strict=True)]
        emb = target.embed([tree.tokens[n] for n in frontier])
        pos = torch.tensor([[root_pos + tree.depths[n] for n in frontier]])
        prev = torch.stack([scratch_feats[feat_slot[tree.parents[n]]] for n in frontier])[None]
        ck, cv = torch.cat([state.cross_k, scratch_k], 2), torch.cat([state.cross_v, scratch_v], 2)
        out = draft(emb, pos, self_mask, caches, ck, cv, cross_mask, prev)
        scratch_self = [(torch.cat([s[0], kv[0]], 2), torch.cat([s[1], kv[1]], 2))
                        for s, kv in zip(scratch_self, out["self_kv"], strict=True)]
        for r, node in enumerate(frontier):
            feat_slot[node] = scratch_feats.shape[0] + r
        k_new, v_new = draft.cross_kv(out["feature"])
        scratch_k, scratch_v = torch.cat([scratch_k, k_new], 2), torch.cat([scratch_v, v_new], 2)
        scratch_feats = torch.cat([scratch_feats, out["feature"][0]], 0)
        lp = torch.log_softmax(target.logits(out["feature"][0]).float(), -1)
        top = torch.topk(lp, spec.k, -1)
        frontier = tree.expand(top.indices.numpy(), top.values.numpy())
    return tree


def _consumed(final: torch.Tensor, taps: list[torch.Tensor] | None) -> torch.Tensor:
    """What the draft reads of target rows: the final feature, or the layer taps concatenated (EAGLE-3)."""
    return final if taps is None else torch.cat(taps, -1)


@torch.no_grad()
def generate(target: TargetSide, prompt_embeds: torch.Tensor, max_new_tokens: int, draft: Draft | None = None,
             mode: str = "tree", spec: TreeSpec | None = None, sampling: SamplingParams | None = None,
             eos_id: int | None = None, draft_keep: np.ndarray | None = None,
             eagle3_taps: bool = False) -> GenResult:
    """Generate from merged prompt embeddings [1,n,H]: autoregressive (`mode="ar"`) or speculative.

    `draft_keep`: prompt positions the draft sees (visual-token compression); None keeps all.
    """
    sampling = sampling or SamplingParams()
    rng = np.random.default_rng(sampling.seed)
    spec = spec or TreeSpec()
    if mode == "chain":
        spec = TreeSpec.chain(spec.depth)
    dec = target.decoder
    n = prompt_embeds.shape[1]
    pk, pv = dec.empty_cache()
    out = dec(prompt_embeds, torch.arange(n)[None], causal_mask(n), pk, pv)
    cache_k, cache_v = out["new_k"], out["new_v"]

    def choose(logits_row: torch.Tensor) -> int:
        if sampling.greedy:
            return int(torch.argmax(logits_row))
        return sample(probs_from_logits(logits_row.numpy()[None], sampling)[0], rng)

    root = choose(target.logits(out["hidden"][0, -1]).float())
    tokens: list[int] = []
    res = GenResult(tokens)

    def push(tok: int) -> bool:
        tokens.append(tok)
        if eos_id is not None and tok == eos_id:
            res.finish_reason = "stop"
            return True
        return len(tokens) >= max_new_tokens

    if push(root):
        return res
    if mode == "ar" or draft is None:
        m = n
        while True:
            o = dec(target.embed([root]), torch.tensor([[m]]), causal_mask(1, m), cache_k, cache_v)
            cache_k, cache_v = torch.cat([cache_k, o["new_k"]], 3), torch.cat([cache_v, o["new_v"]], 3)
            m += 1
            root = choose(target.logits(o["hidden"][0, -1]).float())
            res.accepted.append(1)
            if push(root):
                return res

    state = _DraftState(draft)
    keep = np.arange(n) if draft_keep is None else np.asarray(draft_keep)
    state.pending = [(int(i), prompt_embeds[0, i]) for i in keep] + [(n, target.embed([root])[0, 0])]
    state.add_features(_consumed(out["hidden"][0], [t[0] for t in out["taps"]] if eagle3_taps else None))
    m = n  # committed tokens in the target cache; `root` sits at position m
    while True:
        tree = draft_tree(state, target, spec, root).finalize()
        ids = torch.from_numpy(tree.tokens)
        emb = target.embed(ids)
        pos = torch.from_numpy(tree.depths)[None] + m
        mask = torch.cat([torch.ones(len(tree), m, dtype=torch.bool), torch.from_numpy(tree.ancestor_mask().copy())], 1)[None]
        o = dec(emb, pos, mask, cache_k, cache_v)
        logits = target.logits(o["hidden"][0]).float()
        if sampling.greedy:
            path, bonus = accept_greedy(tree, torch.argmax(logits, -1).numpy())
        else:
            path, bonus = accept_sampling(tree, probs_from_logits(logits.numpy(), sampling), rng)
        idx = torch.tensor(path)
        # commit by compaction: only the accepted path's KV rows join the cache, contiguously
        cache_k = torch.cat([cache_k, o["new_k"][:, :, :, idx]], 3)
        cache_v = torch.cat([cache_v, o["new_v"][:, :, :, idx]], 3)
        state.add_features(_consumed(o["hidden"][0, idx], [t[0, idx] for t in o["taps"]] if eagle3_taps else None))
        res.accepted.append(len(path))
        new = [int(tree.tokens[i]) for i in path[1:]] + [bonus]
        for j, tok in enumerate(new):
            if push(tok):
                return res
            state.pending.append((m + 1 + j, target.embed([tok])[0, 0]))
        m += len(path)
        root = bonus
