"""Drafting: what proposes each round's candidate tree, over the draft's runtime-owned caches (numpy).

`DraftRunner` owns the draft's caches and the token stream it has not yet seen; a `Drafter` turns
that stream into the tree the target verifies. Four drafters, one interface:

- `NoDrafter`: no draft at all, the root alone (plain autoregressive decoding);
- `ChainGraphDrafter`: a chain from the bundle's `draft_chain` graph, one call per round;
- `StepwiseChainDrafter`: a chain from the `draft` graph, one call per step;
- `TreeDrafter`: an EAGLE-2 dynamic tree from the `draft` graph, one call per layer.

The three that draft start each round with a context pass over the pending tokens (the chain graph
runs it inside its one call), then write their steps' rows into the caches' scratch slots after the
committed rows, where the next round's context pass overwrites them.
"""

from __future__ import annotations

import numpy as np

from dream_export.errors import UsageError
from dream_export.runtime.backend_base import Backend, aligned_zeros
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.masks import cache_mask
from dream_export.runtime.tree import TreeDraft, TreeSpec, VerifyTree, causal, draft_step_masks
from dream_export.runtime.vtc import vtc_keep_indices


class DraftRunner:
    """The draft graphs' caches (self-attention, cross-attention, target features) and token stream.

    Per request: `start` after the prefill, then each round a drafter's `context_pass` and steps, and
    `observe` with what the target accepted. Committed rows: `self_rows` (self-attention) and `cross_rows`
    (projected target features); the draft's own positions are compacted (`next_pos`), the features it
    consumes are indexed by target position.
    """

    def __init__(self, bundle: Bundle, backend: Backend, embed_table: np.ndarray):
        m, d = bundle.manifest, bundle.manifest["dims"]
        self.backend, self.embed_table = backend, embed_table
        self.self_capacity, self.cross_capacity = m["draft_capacity"], m["cross_capacity"]
        self.hidden = d["hidden"]
        self.uses_cross = m["draft"]["uses_cross"]
        draft_io = bundle.graph("draft")
        self.uses_prev = "prev_feat" in draft_io["bindings"]  # EAGLE-style drafts only
        # EAGLE-3: the context pass hands the graph the target's taps (prev_taps, fused in the graph), the
        # steps their own features (prev_feat); the feature store then holds taps
        self.taps_width = next((int(io["shape"][-1]) for io in draft_io["inputs"]
                                if io["name"] == draft_io["bindings"].get("prev_taps")), 0)
        self.used_slots = bundle.graph("draft").get("slots") == "used"
        nb, dkv, dd = d["draft_blocks"], d["draft_kv_heads"], d["draft_head_dim"]
        # 256-byte aligned: TensorRT binds resident buffers by address (setTensorAddress requires it)
        self.self_k, self.self_v = (aligned_zeros((nb, 1, dkv, self.self_capacity, dd)) for _ in range(2))
        self.cross_k, self.cross_v = (aligned_zeros((1, dkv, self.cross_capacity, dd)) for _ in range(2))
        # what the draft reads of each target position: the final feature, or EAGLE-3's taps
        self.feats = np.zeros((m["kv_capacity"] + m["max_tree"], self.taps_width or self.hidden), np.float32)
        self.bindings = {"draft": bundle.graph("draft")["bindings"]}  # the draft-side graphs called
        # a whole chain round per call, when the bundle has the graph and the backend runs it
        self.chain_steps = 0
        if "draft_chain" in backend.graphs:
            self.bindings["draft_chain"] = bundle.graph("draft_chain")["bindings"]
            self.chain_steps = bundle.graph("draft_chain")["steps"]
        for graph, b in self.bindings.items():
            for role, buf in (("self_key", self.self_k), ("self_value", self.self_v), ("cross_key", self.cross_k),
                              ("cross_value", self.cross_v), ("embed_table", embed_table)):
                if role in b:
                    backend.register_resident(graph, b[role], buf)
        # the request's stream (set by `start`)
        self.n_feats = self.feats_seen = self.self_rows = self.cross_rows = self.next_pos = 0
        self.pending_pos, self.pending_emb = np.zeros(0, np.int64), self.no_feats()

    def embed(self, ids) -> np.ndarray:
        """Embedding rows of token ids (the target's table)."""
        return self.embed_table[np.asarray(ids, dtype=np.int64)]

    # ---- the token stream ----------------------------------------------------------------------
    def start(self, prompt_embeds: np.ndarray, image_mask: np.ndarray, vtc_keep: float | None,
              importance: np.ndarray | None, features: np.ndarray, root: int) -> None:
        """A new request: the prefill's target features; the prompt (its image tokens cut to the `vtc_keep`
        share the target attended to most, by `importance`) and the root are the first pending tokens."""
        n = len(prompt_embeds)
        keep = np.arange(n)
        if vtc_keep is not None:
            if importance is None:
                raise UsageError("visual-token compression needs the attention importance output: re-export "
                                 "without --no-attn-scores")
            keep = vtc_keep_indices(image_mask, importance, vtc_keep)
        self.feats[:n] = features
        self.n_feats = n  # target features so far (= committed target positions)
        self.feats_seen = 0  # of which already in the cross cache
        self.self_rows, self.cross_rows, self.next_pos = 0, 0, 0
        self.pending_pos = np.append(keep, n)
        self.pending_emb = np.concatenate([prompt_embeds[keep], self.embed([root])])

    def observe(self, features: np.ndarray, tokens: list[int]) -> None:
        """After a verify pass: the accepted rows' target features, and the round's new tokens to feed."""
        at = self.n_feats
        self.feats[at:at + len(features)] = features
        self.n_feats += len(features)
        self.pending_pos = np.arange(at + 1, at + 1 + len(tokens))
        self.pending_emb = self.embed(tokens)

    def fits(self, nodes: int) -> bool:
        """Whether the self-attention cache holds the pending tokens and a round of `nodes` draft rows."""
        return self.self_rows + len(self.pending_pos) + nodes < self.self_capacity

    # ---- graph calls -----------------------------------------------------------------------------
    def run(self, graph: str, embeds, positions, self_mask, new_feats, cross_mask, prev_feat,
            prev_taps: np.ndarray | None = None) -> dict:
        """One call of the draft graph, or of the draft_chain graph (the same inputs plus the embedding table).

        `prev_feat` [T,H] / `prev_taps` [T,taps·H]: the rows' predecessors (EAGLE-style drafts); an EAGLE-3
        graph sums the two (its fuse is linear without bias), so the one not given is fed as zeros.
        """
        t = len(positions)
        if self.taps_width:
            prev_feat = np.zeros((t, self.hidden), np.float32) if prev_feat is None else prev_feat
            prev_taps = np.zeros((t, self.taps_width), np.float32) if prev_taps is None else prev_taps
        roles = {"embeds": embeds[None].astype(np.float32, copy=False), "positions": positions[None],
                 "self_mask": self_mask[None], "self_key": self.self_k, "self_value": self.self_v,
                 "cross_key": self.cross_k, "cross_value": self.cross_v,
                 "new_feats": new_feats[None].astype(np.float32, copy=False), "cross_mask": cross_mask[None],
                 "prev_feat": None if prev_feat is None else prev_feat[None].astype(np.float32, copy=False),
                 "prev_taps": None if prev_taps is None else prev_taps[None].astype(np.float32, copy=False),
                 "embed_table": self.embed_table}
        # the exporter drops inputs a graph does not read (DREAM: prev_feat; EAGLE: the cross cache; all but
        # EAGLE-3: prev_taps)
        b = self.bindings[graph]
        return self.backend.run(graph, {b[r]: v for r, v in roles.items() if r in b})

    def out(self, out: dict, role: str, graph: str = "draft") -> np.ndarray:
        """A call's output by role (`feature`, `topk_ids`, `topk_logprobs`, `chain_ids`, ...)."""
        return out[self.bindings[graph][role]]

    def commit(self, out: dict, graph: str, self_at: int, cross_at: int) -> None:
        """Write a call's new rows at slots `self_at` (self-attention) and `cross_at` (cross-attention):
        a context pass's after the committed rows, a tree or chain step's into the round's scratch."""
        # through the backend, which keeps any device copy of the caches in step
        write = self.backend.write_rows
        write(self.self_k, 3, self_at, self.out(out, "new_self_key", graph))
        write(self.self_v, 3, self_at, self.out(out, "new_self_value", graph))
        if self.uses_cross:
            write(self.cross_k, 2, cross_at, self.out(out, "new_cross_key", graph))
            write(self.cross_v, 2, cross_at, self.out(out, "new_cross_value", graph))

    def no_feats(self) -> np.ndarray:
        return np.zeros((0, self.hidden), np.float32)

    def context_pass(self, graph: str = "draft") -> dict:
        """Run the pending tokens over the committed caches and commit their rows (the target features not
        yet seen join the cross cache); afterwards `self_rows`/`cross_rows` are where scratch starts and
        `next_pos - 1` is the root's draft position."""
        pos, t = self.pending_pos, len(self.pending_pos)
        self_mask = cache_mask(self.self_capacity, self.self_rows, None, causal(t), self.used_slots)
        nf = self.feats[self.feats_seen:self.n_feats] if self.uses_cross else self.no_feats()
        f = nf.shape[0]
        # committed features all precede the pending tokens; a new one is seen from the next position on
        cross_mask = cache_mask(self.cross_capacity, self.cross_rows, None,
                                np.arange(self.feats_seen, self.feats_seen + f)[None] < pos[:, None], self.used_slots)
        prev = (np.stack([self.feats[p - 1] if p > 0 else np.zeros(self.feats.shape[1], np.float32) for p in pos])
                if self.uses_prev else None)
        # every pending token's predecessor is a target position: EAGLE-3 reads its taps
        prev, taps = (None, prev) if self.taps_width else (prev, None)
        out = self.run(graph, self.pending_emb, np.arange(self.next_pos, self.next_pos + t), self_mask, nf,
                       cross_mask, prev, taps)
        self.commit(out, graph, self.self_rows, self.cross_rows)
        self.self_rows, self.cross_rows, self.next_pos, self.feats_seen = (
            self.self_rows + t, self.cross_rows + f, self.next_pos + t, self.n_feats)
        return out


class Drafter:
    """Proposes each round's candidate tree (root first) for the target to verify."""

    def start(self, prompt_embeds: np.ndarray, image_mask: np.ndarray, vtc_keep: float | None,
              importance: np.ndarray | None, features: np.ndarray, root: int) -> None:
        """A new request, after its prefill (see `DraftRunner.start`)."""

    def fits(self, committed: int, capacity: int) -> bool:
        """Whether a round fits the target's KV cache (`committed` of `capacity` slots used) and the draft's."""
        raise NotImplementedError

    def propose(self, root: int) -> VerifyTree:
        """The tree to verify, rooted at the token the target produced last."""
        raise NotImplementedError

    def observe(self, features: np.ndarray, tokens: list[int]) -> None:
        """The accepted rows' target features and the round's new tokens (see `DraftRunner.observe`)."""


class NoDrafter(Drafter):
    """Plain autoregressive decoding: each round verifies the root alone and gains one token."""

    def fits(self, committed: int, capacity: int) -> bool:
        return committed + 1 < capacity

    def propose(self, root: int) -> VerifyTree:
        return VerifyTree.chain([root])


class _SpeculativeDrafter(Drafter):
    """Shared by the drafters that run a draft graph: the token stream lives in the `DraftRunner`."""

    def __init__(self, runner: DraftRunner, spec: TreeSpec):
        self.runner, self.spec = runner, spec

    def start(self, prompt_embeds, image_mask, vtc_keep, importance, features, root) -> None:
        self.runner.start(prompt_embeds, image_mask, vtc_keep, importance, features, root)

    def fits(self, committed: int, capacity: int) -> bool:
        return committed + self.spec.total + 1 < capacity and self.runner.fits(self.spec.total)

    def observe(self, features, tokens) -> None:
        self.runner.observe(features, tokens)


class ChainGraphDrafter(_SpeculativeDrafter):
    """A chain from the `draft_chain` graph: the context pass and every step in one call per round."""

    def propose(self, root: int) -> VerifyTree:
        ids = self.runner.out(self.runner.context_pass("draft_chain"), "chain_ids", "draft_chain")
        return VerifyTree.chain([root, *(int(i) for i in ids)][: self.spec.total])


class StepwiseChainDrafter(_SpeculativeDrafter):
    """A chain from the `draft` graph, one call per step: the k = 1 tree without tree bookkeeping.

    Every step sees all rows before it, so it drafts the same tokens as `TreeDrafter` with k = 1 (tests
    hold them equal); it only skips the per-step ancestor search and mask bookkeeping, a visible share
    of a draft call on a CPU.
    """

    def propose(self, root: int) -> VerifyTree:
        r = self.runner
        ctx = r.context_pass()
        tokens = [root, int(r.out(ctx, "topk_ids")[-1, 0])]
        feat = r.out(ctx, "feature")[0, -1:]  # the parent's draft feature, appended at the next call
        seen = np.ones((1, 1), bool)
        # a chain verifies its first total - 1 draft tokens; deeper steps would be thrown away
        for j in range(min(self.spec.depth, self.spec.total - 1) - 1):
            a, b = r.self_rows + j, r.cross_rows + j
            nf = feat if r.uses_cross else r.no_feats()
            o = r.run("draft", r.embed(tokens[-1:]), np.array([r.next_pos + j]),
                      cache_mask(r.self_capacity, a, None, seen, r.used_slots), nf,
                      cache_mask(r.cross_capacity, b, None, seen[:, :len(nf)], r.used_slots),
                      feat if r.uses_prev else None)
            r.commit(o, "draft", a, b)
            feat = r.out(o, "feature")[0]
            tokens.append(int(r.out(o, "topk_ids")[0, 0]))
        return VerifyTree.chain(tokens[: self.spec.total])


class TreeDrafter(_SpeculativeDrafter):
    """An EAGLE-2 dynamic tree from the `draft` graph: each layer's k-node frontier in one call."""

    def propose(self, root: int) -> VerifyTree:
        r, spec = self.runner, self.spec
        ctx = r.context_pass()
        tree = TreeDraft(spec, root)
        frontier = tree.expand(r.out(ctx, "topk_ids")[-1:, : spec.k], r.out(ctx, "topk_logprobs")[-1:, : spec.k])
        pending_feats = r.out(ctx, "feature")[0, -1:]  # root's draft feature, appended at the next call
        root_pos = r.next_pos - 1
        run_slot: dict[int, int] = {}
        feat_slot = {0: 0}
        n_self, n_cross = 0, 0  # scratch rows already written
        for _ in range(spec.depth - 1):
            fr = len(frontier)
            for i, node in enumerate(frontier):
                run_slot[node] = n_self + i
            sm, cm = draft_step_masks(tree, frontier, run_slot, feat_slot, n_self + fr, n_cross + len(pending_feats))
            self_mask = cache_mask(r.self_capacity, r.self_rows, sm[:, :n_self], sm[:, n_self:], r.used_slots)
            nf = pending_feats if r.uses_cross else r.no_feats()
            cross_mask = cache_mask(r.cross_capacity, r.cross_rows, cm[:, :n_cross], cm[:, n_cross:n_cross + len(nf)],
                                    r.used_slots)
            # every parent is in the previous frontier (or the root): its feature is among those appended now
            prev = (np.stack([pending_feats[feat_slot[tree.parents[n]] - n_cross] for n in frontier])
                    if r.uses_prev else None)
            o = r.run("draft", r.embed([tree.tokens[n] for n in frontier]),
                      np.array([root_pos + tree.depths[n] for n in frontier]), self_mask, nf, cross_mask, prev)
            r.commit(o, "draft", r.self_rows + n_self, r.cross_rows + n_cross)
            n_self += fr
            n_cross += len(pending_feats)
            for i, node in enumerate(frontier):
                feat_slot[node] = n_cross + i
            pending_feats = r.out(o, "feature")[0]
            frontier = tree.expand(r.out(o, "topk_ids")[:, : spec.k], r.out(o, "topk_logprobs")[:, : spec.k])
        return tree.finalize()
