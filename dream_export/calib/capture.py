"""Calibration feeds from the real pipeline: every graph's inputs at the states the engine produces.

A `RecordingBackend` wraps the bundle's ONNX Runtime backend and keeps, per graph and stage, a
seeded reservoir sample of the feeds it forwards. Running `Pipeline.generate` over the calibration
prompts therefore records vision inputs, target prefill and tree-verification feeds, and draft
context and tree-step feeds exactly as the runtime builds them (masks, positions, partly filled
caches). Feeds are copied when kept: the runtime rewrites its cache buffers in place.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dream_export.runtime.backends import Backend
from dream_export.runtime.bundle import Bundle
from dream_export.runtime.tree import TreeSpec

# Stages per graph; the sample budget of a graph is split evenly between its stages.
STAGES = {"vision": ("image",), "target": ("prefill", "verify"), "draft": ("context", "tree")}


@dataclass
class Capture:
    """Recorded feeds per graph (tensor name → array, as the graph's inputs are named) and call counts."""

    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    stages: dict[str, list[str]] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    prompts: int = 0

    def summary(self) -> dict:
        """Kept samples and seen calls per graph/stage (for the manifest and the log)."""
        kept = Counter(f"{g}/{s}" for g, ss in self.stages.items() for s in ss)
        return {"prompts": self.prompts, "calls": dict(sorted(self.calls.items())), "kept": dict(sorted(kept.items()))}


class RecordingBackend(Backend):
    """Forwards every call to `inner` and reservoir-samples the feeds per (graph, stage)."""

    def __init__(self, inner: Backend, bundle: Bundle, samples: int, seed: int = 0):
        super().__init__()
        self.inner, self.name = inner, inner.name
        self.threads = getattr(inner, "threads", None)
        self.rng = np.random.default_rng(seed)
        self.mask_name = bundle.graph("target")["bindings"]["attention_mask"]
        self.budget = {(g, s): max(1, -(-samples // len(ss))) for g, ss in STAGES.items() for s in ss}
        self.kept: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {k: [] for k in self.budget}
        self.seen: Counter = Counter()
        self._last = ""

    def _stage(self, graph: str, feeds: dict[str, np.ndarray]) -> str:
        if graph == "target":
            # a prefill sees no cached slot; verification (and AR decoding) sees the committed prefix
            mask = feeds[self.mask_name]
            past = mask.shape[-1] - mask.shape[-2]  # slots before the new rows: used ones, or the capacity
            return "verify" if mask[..., :past].any() else "prefill"
        if graph == "draft":
            # the engine runs one context pass right after each target pass, then the tree steps
            return "context" if self._last == "target" else "tree"
        return "image"

    def _run(self, graph, feeds, outputs):
        stage = self._stage(graph, feeds)
        self._last = graph
        key = (graph, stage)
        n = self.seen[key]
        self.seen[key] += 1
        res = self.kept[key]
        # reservoir sampling (Algorithm R): every call of a stage is kept with equal probability
        slot = n if n < self.budget[key] else int(self.rng.integers(0, n + 1))
        if slot < self.budget[key]:
            copy = {k: np.array(v, copy=True) for k, v in feeds.items()}
            if slot == len(res):
                res.append(copy)
            else:
                res[slot] = copy
        return self.inner.run(graph, feeds, outputs)

    def register_resident(self, graph: str, name: str, array: np.ndarray) -> None:
        super().register_resident(graph, name, array)
        self.inner.register_resident(graph, name, array)

    def capture(self) -> Capture:
        cap = Capture()
        for (g, s), res in self.kept.items():
            cap.feeds.setdefault(g, []).extend(res)
            cap.stages.setdefault(g, []).extend([s] * len(res))
            cap.calls[f"{g}/{s}"] = self.seen[(g, s)]
        return cap


def capture_feeds(bundle_dir: str | Path, rows: list[dict], samples: int = 64, seed: int = 0,
                  tree: TreeSpec | str | None = None, max_new_tokens: int = 64, threads: int = 1, precision: str = "fp32",
                  progress: bool = True) -> Capture:
    """Run greedy speculative decoding over `rows` ({"image", "prompt"}) and record feeds per graph.

    `tree`: the speculation tree (None: the runtime's default). `samples` is the number of feeds kept per graph (split evenly between its stages); the prompts
    are visited in an order shuffled by `seed`, and the reservoir draws from the same seed, so a
    seed fixes the calibration set.
    """
    from tqdm import tqdm

    from dream_export.runtime.backends import OnnxRuntimeBackend
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.preprocess import load_image

    bundle = Bundle.open(bundle_dir)
    rec = RecordingBackend(OnnxRuntimeBackend(bundle, threads, precision=precision), bundle, samples, seed)
    pipe = Pipeline(bundle, rec)
    order = np.random.default_rng(seed).permutation(len(rows))
    for i in tqdm(order, desc="calibration prompts", disable=not progress, mininterval=2):
        row = rows[int(i)]
        pipe.generate(load_image(row["image"]).convert("RGB"), row["prompt"], max_new_tokens=max_new_tokens,
                      mode="tree", tree=tree)
    cap = rec.capture()
    cap.prompts = len(rows)
    return cap
