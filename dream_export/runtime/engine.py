"""Draft–verify speculation over a bundle's graphs, with runtime-owned fixed-capacity caches (numpy).

The same algorithm as the torch reference (`dream_export.draft.reference`), expressed on
preallocated buffers: the target's KV cache (`TargetRunner`), the draft's self-attention cache
(committed rows + per-round scratch) and its cross-attention cache (projected target features,
append-only, + the round's draft features as scratch) (`DraftRunner`). Each graph call returns only
its new rows; the runners write them into place, so nothing grows with context.

A request is a prefill, then rounds of draft → verify → accept → commit (`SpecEngine.generate`).
Plain autoregressive decoding is the same loop with a drafter that proposes no draft tokens.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
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
from dream_export.runtime.drafting import (
    ChainGraphDrafter,
    Drafter,
    DraftRunner,
    NoDrafter,
    StepwiseChainDrafter,
    TreeDrafter,
)
from dream_export.runtime.masks import SLOT_BUCKET, cache_mask, prefill_mask, row_index
from dream_export.runtime.subnet import chosen_shape, chosen_vtc_keep
from dream_export.runtime.target import TargetRunner
from dream_export.runtime.tree import TreeSpec, VerifyTree, causal

__all__ = ["SLOT_BUCKET", "EngineStats", "Round", "RoundState", "SpecEngine", "cache_mask"]

# The chain depth of a bundle without a draft_chain graph (an EAGLE-style draft): the exporter's default
# chain graph drafts this many tokens per round (its steps + the context pass's own).
DEFAULT_CHAIN_DEPTH = 5


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

    def timed(self, stage: str) -> _Timer:
        """A context manager adding the block's wall time to `seconds[stage]`."""
        return _Timer(self.seconds, stage)


class _Timer:
    """`EngineStats.timed` (a plain class: a generator-based context manager costs more, every round)."""

    __slots__ = ("seconds", "stage", "t0")

    def __init__(self, seconds: dict, stage: str):
        self.seconds, self.stage = seconds, stage

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self.stage] += time.perf_counter() - self.t0


@dataclass
class RoundState:
    """One request between rounds: the target cache's committed slots and the root the next round extends."""

    sampling: SamplingParams
    eos_ids: frozenset[int]  # every id that ends an answer (Gemma3: <eos> and <end_of_turn>)
    max_new_tokens: int
    stats: EngineStats
    committed: int = 0  # target KV slots in use; the root sits at this position
    root: int = -1  # the token the target produced last, not yet in its cache
    produced: int = 0  # tokens yielded so far
    stopped: bool = False  # the last token yielded was EOS
    rope_delta: int = 0  # position − cache slot of generated tokens (mRoPE prompts with images: negative)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    @property
    def done(self) -> bool:
        return self.stopped or self.produced >= self.max_new_tokens

    def take(self, tokens: list[int]) -> list[int]:
        """A round's new tokens, cut after EOS and at `max_new_tokens`, counted as yielded."""
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        if end is not None:
            tokens = tokens[: end + 1]
        tokens = tokens[: self.max_new_tokens - self.produced]
        self.produced += len(tokens)
        self.stopped = bool(tokens) and tokens[-1] in self.eos_ids
        return tokens


class SpecEngine:
    """One request at a time; buffers are allocated once per engine and reused across requests."""

    def __init__(self, bundle: Bundle, backend: Backend, embed_table: np.ndarray):
        m = bundle.manifest
        self.bundle, self.backend, self.embed_table = bundle, backend, embed_table
        self.tree_cap = m["max_tree"]
        self.target = TargetRunner(bundle, backend)
        self.draft = DraftRunner(bundle, backend, embed_table)
        # a chain round is as deep as the exported chain graph (its steps + the context pass's token)
        chain = m["graphs"].get("draft_chain")
        self.chain_depth = chain["steps"] + 1 if chain else DEFAULT_CHAIN_DEPTH
        self.vtc_keep = chosen_vtc_keep(m)  # a searched supernet configuration's visual keep ratio
        self.chosen_shape = chosen_shape(m)  # ... and drafting shape (mode, TreeSpec), when it fixes one
        # Gemma3 reads each image's tokens bidirectionally at prefill
        self.image_blocks = bool(m.get("decoder", {}).get("image_blocks_bidirectional", False))
        # Qwen2.5-VL: the target takes [3, N] (temporal, height, width) positions
        self.mrope = m.get("decoder", {}).get("rope") == "mrope"

    def embed(self, ids) -> np.ndarray:
        """Embedding rows of token ids."""
        return self.draft.embed(ids)

    def next_logits(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """The target's logits for the token after `embeds` [n,H], from a fresh prefill (diagnostics);
        `positions` as for `prefill` (default 0..n-1)."""
        n = embeds.shape[0]
        pos = self._rope(np.arange(n) if positions is None else positions)
        return self.target.out(self.target.run(embeds, pos, causal(n), [n - 1], past=0), "row_logits")[0]

    def default_drafting(self, mode: str | None = None, spec: TreeSpec | None = None) -> tuple[str, TreeSpec | None]:
        """The (mode, shape) a request drafts: what it names, else the bundle's searched shape (for the mode
        that drafts it), else an EAGLE-2 tree (`TreeSpec()`) or a chain as deep as the bundle's chain graph."""
        if self.chosen_shape is not None and spec is None and mode in (None, self.chosen_shape[0]):
            return self.chosen_shape
        mode = mode or "tree"
        if mode == "ar":
            return mode, None
        return mode, TreeSpec.chain(spec.depth if spec else self.chain_depth) if mode == "chain" else spec or TreeSpec()

    def drafter(self, mode: str | None = "tree", spec: TreeSpec | None = None) -> Drafter:
        """The drafter for a mode: 'ar' (none), 'chain' (the chain graph when it drafts this depth, else one
        call per step; depth from the bundle by default), anything else an EAGLE-2 tree (`spec`). Without
        a mode (or a shape for the chosen mode) a searched bundle's chosen shape is used."""
        mode, spec = self.default_drafting(mode, spec)
        if mode == "ar":
            return NoDrafter()
        if spec.total > self.tree_cap:
            raise UsageError(f"tree of {spec.total} nodes exceeds the bundle's max_tree {self.tree_cap}; "
                             "re-export with a larger --max-tree")
        if mode == "chain" and 0 < self.draft.chain_steps == spec.depth - 1:
            return ChainGraphDrafter(self.draft, spec)
        return StepwiseChainDrafter(self.draft, spec) if spec.k == 1 else TreeDrafter(self.draft, spec)

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompt_embeds: np.ndarray, image_mask: np.ndarray, max_new_tokens: int, mode: str | None = "tree",
                 spec: TreeSpec | None = None, sampling: SamplingParams | None = None,
                 eos_id: int | Collection[int] | None = None, vtc_keep: float | None = None, stats: EngineStats | None = None,
                 drafter: Drafter | None = None, positions: np.ndarray | None = None) -> Iterator[Round]:
        """Yield the tokens of each round until EOS (`eos_id`: one id or all that end an answer),
        `max_new_tokens` or the KV capacity.

        `drafter` overrides the one `mode` and `spec` choose (see `drafter`). `vtc_keep` defaults to the
        bundle's chosen supernet configuration's (`self.vtc_keep`). `positions`: the prompt's
        rotary positions when they are not 0..n-1 (mRoPE: [3, n] from `runtime.positions.mrope_positions`).
        """
        vtc_keep = self.vtc_keep if vtc_keep is None else vtc_keep
        drafter = drafter or self.drafter(mode, spec)
        eos_ids = frozenset(() if eos_id is None else [eos_id] if isinstance(eos_id, int) else eos_id)
        st = RoundState(sampling or SamplingParams(), eos_ids, max_new_tokens,
                        stats if stats is not None else EngineStats())
        out = self.prefill(prompt_embeds, st, image_mask, positions)
        yield Round([st.root], 1)
        if st.done:
            return
        drafter.start(prompt_embeds, image_mask, vtc_keep, self.target.prompt_importance(out, len(prompt_embeds)),
                      self.target.features(out), st.root)
        while not st.done and drafter.fits(st.committed, self.target.capacity):
            with st.stats.timed("draft"):
                tree = drafter.propose(st.root)
            with st.stats.timed("verify"):
                out = self.verify(tree, st)
            with st.stats.timed("host"):
                path, bonus = self.accept(tree, out, st)
                new = self.commit(tree, out, path, bonus, st)
                drafter.observe(self.target.features(out)[row_index(np.array(path))], new)
            yield Round(new, len(path))
        # ended by EOS, max_new_tokens or the KV capacity (the pipeline reports finish_reason="capacity")

    # ---- the steps of a request ----------------------------------------------------------------
    def prefill(self, prompt_embeds: np.ndarray, st: RoundState, image_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None) -> dict:
        """Run the prompt through the target, commit its KV rows and pick the first token (the root).
        `image_mask` [n]: the image-token slots (the family's prefill mask may read images bidirectionally);
        `positions`: [n] or mRoPE [3, n] (default 0..n-1); later tokens continue after their largest."""
        n = prompt_embeds.shape[0]
        if n + 1 > self.target.capacity:
            raise UsageError(f"prompt of {n} tokens does not fit the KV capacity {self.target.capacity}")
        mask = causal(n) if image_mask is None else prefill_mask(image_mask, self.image_blocks)
        if positions is None:
            positions = np.arange(n)
        st.rope_delta = int(positions.max(initial=-1)) + 1 - n
        with st.stats.timed("prefill"):
            out = self.target.run(prompt_embeds, self._rope(positions), mask, [n - 1], past=0)
            self.target.commit(out, np.arange(n), 0)
        st.root = self._choose(out, 0, st)
        st.committed, st.produced, st.stopped = n, 1, st.root in st.eos_ids
        return out

    def verify(self, tree: VerifyTree, st: RoundState) -> dict:
        """One target pass over the whole tree, each node seeing the committed context and its ancestors."""
        at = st.committed
        return self.target.run(self.embed(tree.tokens), self._rope(at + st.rope_delta + tree.depths),
                               tree.ancestor_mask(), np.arange(len(tree)),
                               past=at)

    def accept(self, tree: VerifyTree, out: dict, st: RoundState) -> tuple[list[int], int]:
        """The accepted path (node indices, root first) and the bonus token: greedy, or lossless sampling."""
        if len(tree) == 1:  # nothing drafted: the next token as the prefill picks it
            return [0], self._choose(out, 0, st)
        if st.sampling.greedy:
            return accept_greedy(tree, self.target.out(out, "topk_ids")[:, 0])
        return accept_sampling(tree, probs_from_logits(self.target.out(out, "row_logits"), st.sampling), st.rng)

    def commit(self, tree: VerifyTree, out: dict, path: list[int], bonus: int, st: RoundState) -> list[int]:
        """Write the accepted path's KV rows after the committed ones; the round's new tokens (accepted
        drafts + bonus), cut after EOS and at `max_new_tokens`."""
        self.target.commit(out, np.array(path), st.committed)
        st.committed += len(path)
        st.root = bonus
        st.stats.rounds.append(len(path))
        return st.take([int(tree.tokens[i]) for i in path[1:]] + [bonus])

    def _rope(self, positions: np.ndarray) -> np.ndarray:
        """Positions as the target graph takes them: [N], or [3, N] for mRoPE (generated tokens advance all
        three axes together)."""
        if self.mrope and positions.ndim == 1:
            return np.broadcast_to(positions, (3, len(positions)))
        return positions

    def _choose(self, out: dict, row: int, st: RoundState) -> int:
        """The next token from a call's logits row: the argmax, or a sample from the target distribution."""
        if st.sampling.greedy:
            return int(self.target.out(out, "topk_ids")[row, 0])
        return sample(probs_from_logits(self.target.out(out, "row_logits")[row][None], st.sampling)[0], st.rng)
