"""Draft–verify speculation over a bundle's graphs, with runtime-owned fixed-capacity caches (numpy).

The same algorithm as the torch reference (`dream_export.draft.reference`), expressed on
preallocated buffers: the target's KV cache [layers,1,kv_heads,capacity,head_dim], the draft's
self-attention cache (committed rows + per-round tree scratch) and its cross-attention cache
(projected target features, append-only, + the round's draft features as scratch). Each graph call
returns only its new rows; the engine writes them into place, so nothing grows with context.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dream_export.errors import UsageError
from dream_export.runtime.accept import (
    SamplingParams,
    accept_greedy,
    accept_sampling,
    probs_from_logits,
    sample,
)
from dream_export.runtime.backends import Backend
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.tree import TreeDraft, TreeSpec, VerifyTree, causal, draft_step_masks
from dream_export.runtime.vtc import vtc_keep_indices

# Graphs that read only the used cache slots get masks this many slots wide at a time. ONNX Runtime plans
# a call's memory once per distinct set of input shapes and reuses the plan; a mask one slot wider every
# call would replan every call (measured: +0.9 ms on a 3 ms verify call), while 32-slot steps keep the
# shapes few. The extra slots are masked out (softmax weight exactly 0). An empty cache still gets one
# bucket: no call then carries a zero-size cache slice (histogram calibration cannot take one, and
# engines need not handle empty tensors).
SLOT_BUCKET = 32


def cache_mask(capacity: int, committed: int, scratch: np.ndarray | None, new: np.ndarray, used: bool) -> np.ndarray:
    """A graph's visibility mask [queries, W + new rows] over a runtime-owned cache and the call's new rows.

    Every query sees the first `committed` cache slots, then `scratch` [queries, S] over the slots after
    them (this round's draft rows), then `new` over the new rows. W is the capacity, or, for graphs
    exported to read just the used slots (`used`), the committed + scratch slots rounded up to a multiple
    of `SLOT_BUCKET`, at least one bucket and at most the capacity.
    """
    s = 0 if scratch is None else scratch.shape[1]
    width = min(capacity, max(1, -(-(committed + s) // SLOT_BUCKET)) * SLOT_BUCKET) if used else capacity
    m = np.zeros((new.shape[0], width + new.shape[1]), bool)
    m[:, :committed] = True
    if s:
        m[:, committed:committed + s] = scratch
    m[:, width:] = new
    return m


def row_index(rows: np.ndarray) -> slice | np.ndarray:
    """Rows that rise from 0 (a root-to-node path in node order) as an index: a slice (a view, no gather)
    when they are a prefix, as for a chain, a prefill or a plain decoding step."""
    return slice(0, len(rows)) if rows[-1] == len(rows) - 1 else rows


@dataclass
class Round:
    """What one target pass produced."""

    tokens: list[int]
    accepted: int  # tokens gained (accepted drafts + bonus)


@dataclass
class EngineStats:
    """Per-request counters (seconds are host wall time around each stage)."""

    rounds: list[int] = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "host": 0.0})

    @property
    def tau(self) -> float:
        return float(np.mean(self.rounds)) if self.rounds else 0.0


class SpecEngine:
    """One request at a time; buffers are allocated once per engine and reused across requests."""

    def __init__(self, bundle: Bundle, backend: Backend, embed_table: np.ndarray):
        m = bundle.manifest
        d = m["dims"]
        self.bundle, self.backend, self.embed_table = bundle, backend, embed_table
        self.cap, self.tree_cap = m["kv_capacity"], m["max_tree"]
        self.dcap, self.ccap = m["draft_capacity"], m["cross_capacity"]
        self.hidden = d["hidden"]
        self.uses_cross = m["draft"]["uses_cross"]
        self.eagle3 = m["draft"]["eagle3_taps"]
        self.uses_prev = "prev_feat" in bundle.graph("draft")["bindings"]  # EAGLE-style drafts only
        self.tb = bundle.graph("target")["bindings"]
        # masks as wide as the used cache rows (attention then costs what the context holds, not what the
        # cache could hold), where the graphs were exported to read only those
        self.used_slots = bundle.graph("target").get("slots") == "used"
        self.draft_used_slots = bundle.graph("draft").get("slots") == "used"
        self.db = bundle.graph("draft")["bindings"]
        f32 = np.float32
        self.kv_k = np.zeros((d["layers"], 1, d["kv_heads"], self.cap, d["head_dim"]), f32)
        self.kv_v = np.zeros_like(self.kv_k)
        nb, dkv, dd = d["draft_blocks"], d["draft_kv_heads"], d["draft_head_dim"]
        self.self_k = np.zeros((nb, 1, dkv, self.dcap, dd), f32)
        self.self_v = np.zeros_like(self.self_k)
        self.cross_k = np.zeros((1, dkv, self.ccap, dd), f32)
        self.cross_v = np.zeros_like(self.cross_k)
        self.feats = np.zeros((self.cap + self.tree_cap, self.hidden), f32)  # per target position
        for role, buf in (("past_key", self.kv_k), ("past_value", self.kv_v)):
            backend.register_resident("target", self.tb[role], buf)
        self.bindings = {"draft": self.db}  # the draft-side graphs this engine calls
        # a whole chain round per draft call, when the bundle has the graph and the backend runs it
        self.chain_steps = 0
        if "draft_chain" in backend.graphs:
            self.cb = self.bindings["draft_chain"] = bundle.graph("draft_chain")["bindings"]
            self.chain_steps = bundle.graph("draft_chain")["steps"]
        for graph, b in self.bindings.items():
            for role, buf in (("self_key", self.self_k), ("self_value", self.self_v), ("cross_key", self.cross_k),
                              ("cross_value", self.cross_v), ("embed_table", embed_table)):
                if role in b:
                    backend.register_resident(graph, b[role], buf)

    # ---- graph calls -------------------------------------------------------------------------
    def _target(self, embeds, positions, new_mask, rows, past: int) -> dict:
        mask = cache_mask(self.cap, past, None, new_mask, self.used_slots)[None]
        tb = self.tb
        feeds = {tb["inputs_embeds"]: embeds[None].astype(np.float32, copy=False),
                 tb["position_ids"]: positions[None].astype(np.int64), tb["attention_mask"]: mask,
                 tb["past_key"]: self.kv_k, tb["past_value"]: self.kv_v,
                 tb["logit_rows"]: np.asarray(rows, dtype=np.int64)}
        return self.backend.run("target", feeds)

    def _commit_target(self, out: dict, rows: np.ndarray, at: int) -> None:
        n, pick = len(rows), row_index(rows)
        self.kv_k[:, :, :, at:at + n] = out[self.tb["new_key"]][:, :, :, pick]
        self.kv_v[:, :, :, at:at + n] = out[self.tb["new_value"]][:, :, :, pick]

    def _draft(self, embeds, positions, self_mask, new_feats, cross_mask, prev_feat, graph: str = "draft") -> dict:
        """One call of the draft graph, or of the draft_chain graph (the same inputs plus the embedding table)."""
        roles = {"embeds": embeds[None].astype(np.float32, copy=False), "positions": positions[None],
                 "self_mask": self_mask[None], "self_key": self.self_k, "self_value": self.self_v,
                 "cross_key": self.cross_k, "cross_value": self.cross_v,
                 "new_feats": new_feats[None].astype(np.float32, copy=False), "cross_mask": cross_mask[None],
                 "prev_feat": None if prev_feat is None else prev_feat[None].astype(np.float32, copy=False),
                 "embed_table": self.embed_table}
        # the exporter drops inputs a graph does not read (DREAM: prev_feat; EAGLE: the cross cache)
        b = self.bindings[graph]
        return self.backend.run(graph, {b[r]: v for r, v in roles.items() if r in b})

    def _commit_draft(self, out: dict, graph: str, d_rows: int, c_rows: int) -> None:
        """Write a draft call's new rows at slots `d_rows` (self-attention) and `c_rows` (cross-attention):
        a context pass's after the committed rows, a tree or chain step's into the round's scratch."""
        bindings = self.bindings[graph]
        k = out[bindings["new_self_key"]]
        self.self_k[:, :, :, d_rows:d_rows + k.shape[3]] = k
        self.self_v[:, :, :, d_rows:d_rows + k.shape[3]] = out[bindings["new_self_value"]]
        if self.uses_cross:
            ck = out[bindings["new_cross_key"]]
            self.cross_k[:, :, c_rows:c_rows + ck.shape[2]] = ck
            self.cross_v[:, :, c_rows:c_rows + ck.shape[2]] = out[bindings["new_cross_value"]]

    def next_logits(self, embeds: np.ndarray) -> np.ndarray:
        """The target's logits for the token after `embeds` [n,H], from a fresh prefill (diagnostics)."""
        n = embeds.shape[0]
        out = self._target(embeds, np.arange(n), causal(n), [n - 1], past=0)
        return out[self.tb["row_logits"]][0]

    def embed(self, ids) -> np.ndarray:
        return self.embed_table[np.asarray(ids, dtype=np.int64)]

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompt_embeds: np.ndarray, image_mask: np.ndarray, max_new_tokens: int, mode: str = "tree",
                 spec: TreeSpec | None = None, sampling: SamplingParams | None = None, eos_id: int | None = None,
                 vtc_keep: float | None = None, stats: EngineStats | None = None) -> Iterator[Round]:
        """Yield the tokens of each round until EOS, `max_new_tokens` or the KV capacity."""
        sampling = sampling or SamplingParams()
        spec = TreeSpec.chain(spec.depth if spec else 5) if mode == "chain" else (spec or TreeSpec())
        if mode != "ar" and spec.total > self.tree_cap:
            raise UsageError(f"tree of {spec.total} nodes exceeds the bundle's max_tree {self.tree_cap}; "
                             "re-export with a larger --max-tree")
        stats = stats if stats is not None else EngineStats()
        rng = np.random.default_rng(sampling.seed)
        n = prompt_embeds.shape[0]
        if n + 1 > self.cap:
            raise UsageError(f"prompt of {n} tokens does not fit the KV capacity {self.cap}")
        t0 = time.perf_counter()
        out = self._target(prompt_embeds, np.arange(n), causal(n), [n - 1], past=0)
        self._commit_target(out, np.arange(n), 0)
        stats.seconds["prefill"] += time.perf_counter() - t0

        def choose(logits_row: np.ndarray, topk_row: np.ndarray) -> int:
            if sampling.greedy:
                return int(topk_row[0])
            return sample(probs_from_logits(logits_row[None], sampling)[0], rng)

        root = choose(out[self.tb["row_logits"]][0], out[self.tb["topk_ids"]][0])
        produced = 1
        yield Round([root], 1)
        if root == eos_id:
            return
        if mode == "ar":
            m = n
            while produced < max_new_tokens and m + 1 < self.cap:
                t1 = time.perf_counter()
                o = self._target(self.embed([root]), np.array([m]), np.ones((1, 1), bool), [0], past=m)
                self._commit_target(o, np.array([0]), m)
                stats.seconds["verify"] += time.perf_counter() - t1
                m += 1
                root = choose(o[self.tb["row_logits"]][0], o[self.tb["topk_ids"]][0])
                produced += 1
                stats.rounds.append(1)
                yield Round([root], 1)
                if root == eos_id:
                    return
            return
        # draft state: committed rows D (self) / C (cross), pending (orig position, embedding)
        feats_in = out[self.tb["taps"]][0] if self.eagle3 else out[self.tb["hidden"]][0]
        self.feats[:n] = feats_in
        keep = np.arange(n)
        if vtc_keep is not None:
            if "attn_importance" not in self.tb:
                raise UsageError("visual-token compression needs the attention importance output: re-export "
                                 "without --no-attn-scores")
            keep = vtc_keep_indices(image_mask, out[self.tb["attn_importance"]][:n], vtc_keep)
        pending_pos = np.append(keep, n)
        pending_emb = np.concatenate([prompt_embeds[keep], self.embed([root])])
        d_rows, c_rows, next_pos = 0, 0, 0
        new_feat_from = 0  # target features not yet appended to the cross cache
        m = n
        while produced < max_new_tokens:
            if m + spec.total + 1 >= self.cap or d_rows + len(pending_pos) + spec.total >= self.dcap:
                return  # KV capacity reached (the pipeline reports finish_reason="capacity")
            t1 = time.perf_counter()
            # context pass over the pending tokens
            pos, t = pending_pos, len(pending_pos)
            self_mask = cache_mask(self.dcap, d_rows, None, causal(t), self.draft_used_slots)
            nf = self.feats[new_feat_from:m] if self.uses_cross else np.zeros((0, self.hidden), np.float32)
            f = nf.shape[0]
            # committed features all precede the pending tokens; a new one is seen from the next position on
            cross_mask = cache_mask(self.ccap, c_rows, None, np.arange(new_feat_from, new_feat_from + f)[None]
                                    < pos[:, None], self.draft_used_slots)
            prev = (np.stack([self.feats[p - 1] if p > 0 else np.zeros(self.hidden, np.float32) for p in pos])
                    if self.uses_prev else None)
            emb, dpos = pending_emb, np.arange(next_pos, next_pos + t)
            # one call for the context pass and every chain step where the draft_chain graph fits the chain
            whole = mode == "chain" and 0 < self.chain_steps == min(spec.depth, spec.total - 1) - 1
            graph = "draft_chain" if whole else "draft"
            o = self._draft(emb, dpos, self_mask, nf, cross_mask, prev, graph)
            self._commit_draft(o, graph, d_rows, c_rows)
            if whole:
                vt = VerifyTree.chain([root, *(int(i) for i in o[self.cb["chain_ids"]])][: spec.total])
            else:
                draft = self._draft_chain if spec.k == 1 else self._draft_tree
                vt = draft(spec, root, o, d_rows + t, c_rows + f, next_pos + t - 1)
            d_rows, c_rows, next_pos, new_feat_from = d_rows + t, c_rows + f, next_pos + t, m
            t2 = time.perf_counter()
            stats.seconds["draft"] += t2 - t1
            # verify the whole tree in one target pass
            o = self._target(self.embed(vt.tokens), m + vt.depths, vt.ancestor_mask(), np.arange(len(vt)), past=m)
            t3 = time.perf_counter()
            stats.seconds["verify"] += t3 - t2
            if sampling.greedy:
                path, bonus = accept_greedy(vt, o[self.tb["topk_ids"]][:, 0])
            else:
                path, bonus = accept_sampling(vt, probs_from_logits(o[self.tb["row_logits"]], sampling), rng)
            idx = np.array(path)
            self._commit_target(o, idx, m)
            src = o[self.tb["taps"]][0] if self.eagle3 else o[self.tb["hidden"]][0]
            self.feats[m:m + len(idx)] = src[row_index(idx)]
            new = [int(vt.tokens[i]) for i in path[1:]] + [bonus]
            if eos_id in new:
                new = new[: new.index(eos_id) + 1]
            new = new[: max_new_tokens - produced]
            pending_pos = np.arange(m + 1, m + 1 + len(new))
            pending_emb = self.embed(new)
            m += len(path)
            root = bonus
            produced += len(new)
            stats.rounds.append(len(path))
            stats.seconds["host"] += time.perf_counter() - t3
            yield Round(new, len(path))
            if new and new[-1] == eos_id:
                return

    def _draft_chain(self, spec: TreeSpec, root: int, ctx_out: dict, d_rows: int, c_rows: int,
                     root_pos: int) -> VerifyTree:
        """The k = 1 tree without tree bookkeeping: every draft step sees all rows before it.

        Same tokens as `_draft_tree` with k = 1 (tests hold them equal); it only skips the per-step
        ancestor search and mask bookkeeping, a visible share of a draft call on a CPU.
        """
        db, used = self.db, self.draft_used_slots
        tokens = [root, int(ctx_out[db["topk_ids"]][-1, 0])]
        feat = ctx_out[db["feature"]][0, -1:]  # the parent's draft feature, appended at the next call
        steps = min(spec.depth, spec.total - 1) - 1
        empty = np.zeros((0, self.hidden), np.float32)
        seen = np.ones((1, 1), bool)
        # a chain verifies its first total - 1 draft tokens; deeper steps would be thrown away
        for j in range(steps):
            a, b = d_rows + j, c_rows + j
            nf = feat if self.uses_cross else empty
            o = self._draft(self.embed(tokens[-1:]), np.array([root_pos + j + 1]),
                            cache_mask(self.dcap, a, None, seen, used), nf,
                            cache_mask(self.ccap, b, None, seen[:, :len(nf)], used), feat if self.uses_prev else None)
            self._commit_draft(o, "draft", a, b)
            feat = o[db["feature"]][0]
            tokens.append(int(o[db["topk_ids"]][0, 0]))
        return VerifyTree.chain(tokens[: spec.total])

    def _draft_tree(self, spec: TreeSpec, root: int, ctx_out: dict, d_rows: int, c_rows: int,
                    root_pos: int) -> VerifyTree:
        db = self.db
        tree = TreeDraft(spec, root)
        frontier = tree.expand(ctx_out[db["topk_ids"]][-1:, : spec.k], ctx_out[db["topk_logprobs"]][-1:, : spec.k])
        pending_feats = ctx_out[db["feature"]][0, -1:]  # root's draft feature, appended at the next call
        run_slot: dict[int, int] = {}
        feat_slot = {0: 0}
        n_self, n_cross = 0, 0  # scratch rows already written
        for _ in range(spec.depth - 1):
            fr = len(frontier)
            for r, node in enumerate(frontier):
                run_slot[node] = n_self + r
            sm, cm = draft_step_masks(tree, frontier, run_slot, feat_slot, n_self + fr, n_cross + len(pending_feats))
            used = self.draft_used_slots
            self_mask = cache_mask(self.dcap, d_rows, sm[:, :n_self], sm[:, n_self:], used)
            nf = pending_feats if self.uses_cross else np.zeros((0, self.hidden), np.float32)
            cross_mask = cache_mask(self.ccap, c_rows, cm[:, :n_cross], cm[:, n_cross:n_cross + len(nf)], used)
            # every parent is in the previous frontier (or the root): its feature is among those appended now
            prev = (np.stack([pending_feats[feat_slot[tree.parents[n]] - n_cross] for n in frontier])
                    if self.uses_prev else None)
            o = self._draft(self.embed([tree.tokens[n] for n in frontier]),
                            np.array([root_pos + tree.depths[n] for n in frontier]), self_mask, nf, cross_mask, prev)
            self._commit_draft(o, "draft", d_rows + n_self, c_rows + n_cross)
            n_self += fr
            n_cross += len(pending_feats)
            for r, node in enumerate(frontier):
                feat_slot[node] = n_cross + r
            pending_feats = o[db["feature"]][0]
            frontier = tree.expand(o[db["topk_ids"]][:, : spec.k], o[db["topk_logprobs"]][:, : spec.k])
        return tree.finalize()
