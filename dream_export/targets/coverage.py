"""Build plans checked against the calls the runtime really makes.

`record_calls` runs real requests through the bundle's runtime (`Pipeline` + `SpecEngine`) on ONNX
Runtime, restricted to the graphs the TensorRT backend runs, and records every graph call: its input
shapes and dtypes, which inputs were the runtime-owned caches, and where each input's memory sat.
`check_plan` tells which of those calls fit no optimization profile of a build plan (the TensorRT
backend would refuse them on the device). `save_verify_feeds` saves a few recorded feeds per component
in polygraphy's JSON input format, so `polygraphy run --load-inputs` compares an engine with ONNX
Runtime on inputs the runtime itself produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dream_export.runtime.backend_base import Backend
from dream_export.runtime.trt_backend import Range, TensorRTBackend, profile_fits

# The request kinds every plan must serve: plain decoding, chains, the paper's default tree, lossless
# sampling and visual-token compression (each a set of `Pipeline.generate` options).
DEFAULT_REQUESTS: tuple[dict, ...] = (
    {"mode": "ar"},
    {"mode": "chain"},
    {"mode": "tree", "tree": "4,6,32"},
    {"mode": "tree", "tree": "2,4,8", "temperature": 0.8, "seed": 0},
    {"mode": "tree", "tree": "4,6,32", "vtc_keep": 0.75},
)


@dataclass
class GraphCall:
    """One graph call as the runtime made it."""

    graph: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    buffers: dict[str, tuple[int, int] | None]  # input -> (data pointer, bytes) if C-contiguous, else None
    resident: frozenset[str]  # inputs passed as the runtime-owned buffer registered for them
    request: str  # which request made the call (prompt length and options)
    feeds: dict[str, np.ndarray] | None = None  # copies of the inputs, when the recorder was asked to keep them


class RecordingBackend(Backend):
    """A real backend (ONNX Runtime) that records every call made through it.

    `graphs` limits the graphs offered to the runtime (by default those the TensorRT backend runs, so the
    runtime makes the calls it would make on the device); `keep` selects calls whose inputs are copied.
    """

    name = "recording"

    def __init__(self, inner: Backend, graphs: Iterable[str] = TensorRTBackend.graphs,
                 keep: Callable[[GraphCall], bool] | None = None):
        super().__init__()
        self.inner = inner
        self.graphs = frozenset(graphs) & inner.graphs
        self.keep = keep
        self.calls_made: list[GraphCall] = []
        self.request = ""

    def register_resident(self, graph: str, name: str, array: np.ndarray) -> None:
        super().register_resident(graph, name, array)
        self.inner.register_resident(graph, name, array)

    def write_rows(self, array: np.ndarray, axis: int, start: int, values: np.ndarray) -> None:
        self.inner.write_rows(array, axis, start, values)

    def _run(self, graph, feeds, outputs):
        resident = self.resident.get(graph, {})
        call = GraphCall(graph, {n: tuple(a.shape) for n, a in feeds.items()},
                         {n: str(a.dtype) for n, a in feeds.items()},
                         {n: (a.ctypes.data, a.nbytes) if a.flags.c_contiguous else None for n, a in feeds.items()},
                         frozenset(n for n, a in feeds.items() if resident.get(n) is a), self.request)
        if self.keep is not None and self.keep(call):
            call.feeds = {n: np.array(a, copy=True) for n, a in feeds.items()}
        self.calls_made.append(call)
        return self.inner.run(graph, feeds, outputs)


def default_image(size: int = 96) -> np.ndarray:
    """A fixed RGB test image (seeded noise): the calls' shapes do not depend on its content."""
    return default_image_of(size, size)


def default_image_of(width: int, height: int) -> np.ndarray:
    """A fixed RGB test image of (width, height) pixels (seeded noise)."""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def probe_image_sizes(manifest: dict) -> list[tuple[int, int]]:
    """(width, height) of images whose vision calls span a dynamic vision graph's range (none for a static
    one, whose calls all have one shape): a tiny image (enlarged or padded to the fewest views / patches),
    a typical photo, the largest the preprocessing keeps (square and both elongations), and for tiled
    images one per grid pinpoint (each tile count). On a full-size checkpoint the largest image's vision
    call is the replay's most expensive (Qwen2.5-VL: its patches squared in attention masks)."""
    from dream_export.targets.bundle_builds import TYPICAL_IMAGE

    v, pre = manifest.get("vision") or {}, manifest.get("preprocess") or {}
    size = pre.get("size") or {}
    edge = {"anyres": lambda: max(max(int(h), int(w)) for h, w in v["pinpoints"]),
            "split": lambda: int(size["longest_edge"]),
            "rows": lambda: int(size.get("longest_edge") or max(size["height"], size["width"])),
            "grid": lambda: int(size["longest_edge"] ** 0.5)}.get(v.get("layout"))
    if edge is None:
        return []
    e = edge()
    thin = max(8, e // 6)  # elongated, within Qwen2-VL's aspect-ratio limit of 200
    sizes = [(12, 12), TYPICAL_IMAGE[::-1], (e, e), (e, thin), (thin, e)]
    sizes += [(int(w), int(h)) for h, w in v.get("pinpoints", ())]
    return list(dict.fromkeys(sizes))


def capacity_prompts(pipe, lengths: Iterable[int] | None = None, image=None) -> list[str]:
    """Prompts whose templated token counts run from the shortest a request may have (one character: an
    empty prompt is refused) to the longest the KV capacity takes (`kv_capacity - 1`: one slot stays for
    the first answer token), through one that leaves just room for a round of the largest tree. Each is
    the longest text of repeated words whose count does not pass the wanted length. Counts are taken with
    `image` (needed where an image's token count depends on it)."""
    m = pipe.bundle.manifest
    cap, tree = m["kv_capacity"], m["max_tree"]
    # the image preprocessed once, not once per text counted (thousands on a full-size checkpoint)
    inputs = None if image is None else pipe.preprocess.preprocess([image])

    def count(text: str) -> int:
        return len(pipe.prompt_ids(text, image, inputs))

    shortest = "?"
    base = count(shortest)
    wanted = sorted(set(lengths or (base, (base + cap) // 2, cap - tree - 2, cap - 1)))
    prompts = []
    for n in wanted:
        if n < base or n >= cap:  # shorter than the image's own tokens, or no room left to answer
            continue
        text, words = shortest, ("red", "circle", "a", "the", "square", "blue")
        i = 0
        while True:
            longer = (text + " " + words[i % len(words)]).strip()
            if count(longer) > n:
                break
            text, i = longer, i + 1
        prompts.append(text)
    return prompts


def _label(prompt_tokens: int, request: dict) -> str:
    return f"{prompt_tokens} tokens, " + ", ".join(f"{k}={v}" for k, v in request.items())


def record_calls(bundle_dir: str | Path, prompts: Iterable[str] | None = None,
                 requests: Iterable[dict] = DEFAULT_REQUESTS, image: np.ndarray | None = None,
                 max_new_tokens: int | None = None, graphs: Iterable[str] = TensorRTBackend.graphs,
                 keep: Callable[[GraphCall], bool] | None = None, precision: str = "fp32",
                 recorder: list[RecordingBackend] | None = None, images: Iterable | None = None) -> list[GraphCall]:
    """Every graph call the runtime makes answering each prompt with each request on ONNX Runtime (CPU).

    prompts: texts (default `capacity_prompts`: shortest to capacity-filling). requests: `generate`
    options (default `DEFAULT_REQUESTS`; trees larger than the bundle's `max_tree` are cut to it).
    image: the image of those requests (default `default_image`). images: more images (PIL or arrays),
    each asked the shortest and the longest prompt that fits with it under the first request, for a few
    tokens (the decoding calls do not depend on the image); default: for a dynamic vision graph, images of
    `probe_image_sizes` (its fewest to most views / patches), for a static one none.
    max_new_tokens: default the KV capacity, so answers run to the capacity (EOS is ignored). graphs: those the
    runtime may use (default: the TensorRT backend's). keep: which calls keep copies of their inputs.
    recorder: a list that receives the `RecordingBackend` (its registered caches, for replaying bindings).
    """
    from dream_export.runtime.backends import OnnxRuntimeBackend
    from dream_export.runtime.bundle import Bundle
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.tree import TreeSpec

    bundle = Bundle.open(bundle_dir)
    backend = RecordingBackend(OnnxRuntimeBackend(bundle, threads=1, precision=precision), graphs, keep)
    pipe = Pipeline(bundle, backend)
    # answers run on to max_new_tokens or the capacity: an early EOS would leave the longest shapes (and,
    # on a model that stops at once, every draft call) unrecorded
    pipe.eos_ids = frozenset()
    if recorder is not None:
        recorder.append(backend)
    image = default_image() if image is None else image
    if images is None:
        images = [default_image_of(w, h) for w, h in probe_image_sizes(bundle.manifest)]
    cap, max_tree = bundle.manifest["kv_capacity"], bundle.manifest["max_tree"]
    requests = list(requests)

    def ask(img, prompt, req, new_tokens):
        req = dict(req)
        if "tree" in req:
            spec = TreeSpec.parse(req["tree"])
            req["tree"] = f"{spec.k},{spec.depth},{min(spec.total, max_tree)}"
        backend.request = _label(len(pipe.prompt_ids(prompt, img)), req)
        pipe.generate(img, prompt, max_new_tokens=new_tokens, **req)

    for prompt in (capacity_prompts(pipe, image=image) if prompts is None else prompts):
        for req in requests:
            ask(image, prompt, req, max_new_tokens or cap)
    for img in images:
        short = capacity_prompts(pipe, image=img)
        for prompt in dict.fromkeys(short[:1] + short[-1:]):
            ask(img, prompt, requests[0] if requests else {}, min(max_new_tokens or cap, 8))
    return backend.calls_made


def _ranges(plan) -> dict[str, list[Range]]:
    """{component: [{input: (min, max)}]} from `GraphBuild`s or from {component: [{input: (min, opt, max)}]}."""
    if isinstance(plan, dict):
        items = plan.items()
    else:
        items = ((b.component, b.profiles) for b in plan)
    return {c: [{n: (tuple(mom[0]), tuple(mom[-1])) for n, mom in p.items()} for p in profiles]
            for c, profiles in items}


def check_plan(manifest: dict, plan, calls: Iterable[GraphCall], max_examples: int = 5) -> dict:
    """Which recorded calls fit no optimization profile of `plan` (a list of `GraphBuild`, or
    {component: [profile]} as `bundle_builds.graph_profiles` returns).

    A call is covered when one profile holds every engine input's shape within [min, max] (what
    `TensorRTBackend` needs to run it); a call to a graph the plan builds no engine for is uncovered.
    Returns {"calls": N, "uncovered": K, "by_graph": {graph: {"calls", "uncovered"}}, "examples": [...]}
    with up to `max_examples` uncovered calls (graph, request, shapes).
    """
    ranges = _ranges(plan)
    by_graph: dict[str, dict[str, int]] = {}
    examples: list[dict] = []
    n = k = 0
    for call in calls:
        n += 1
        counts = by_graph.setdefault(call.graph, {"calls": 0, "uncovered": 0})
        counts["calls"] += 1
        profiles = ranges.get(call.graph)
        if profiles and any(profile_fits(r, call.shapes) for r in profiles):
            continue
        k += 1
        counts["uncovered"] += 1
        if len(examples) < max_examples:
            examples.append({"graph": call.graph, "request": call.request,
                             "reason": "fits no profile" if profiles else "the plan builds no engine for it",
                             "shapes": {name: list(s) for name, s in call.shapes.items()}})
    return {"calls": n, "uncovered": k, "by_graph": by_graph, "examples": examples,
            "graphs_planned": sorted(ranges), "manifest_capacity": manifest.get("kv_capacity")}


@dataclass
class _FeedPicker:
    """Keeps the first `per_kind` calls of each kind: a graph and the set of its profiles that accept the
    call (a prefill fits the prefill profile, and the verify one when short; a verify call only the latter)."""

    profiles: dict[str, list[Range]]
    per_kind: int
    seen: dict[tuple, int] = field(default_factory=dict)

    def __call__(self, call: GraphCall) -> bool:
        fits = frozenset(i for i, r in enumerate(self.profiles.get(call.graph, [])) if profile_fits(r, call.shapes))
        if not fits:  # uncovered: check_plan reports it; it cannot be a verification feed
            return False
        key = (call.graph, fits)
        if self.seen.get(key, 0) >= self.per_kind:
            return False
        self.seen[key] = self.seen.get(key, 0) + 1
        return True


def save_verify_feeds(bundle_dir: str | Path, out_dir: str | Path, per_kind: int = 1,
                      max_bytes: int = 64 * 2**20,
                      prompts: Iterable[str] = ("What is in the picture?", "Why?")) -> dict[str, Path]:
    """Record a few short tree-mode and plain requests and save, per component, its first `per_kind` calls per
    kind (the set of the plan's optimization profiles that accept a call: vision: its one call; target:
    prefill + verify; draft: context pass + tree step) as `out_dir/<component>.json` in polygraphy's JSON input format (a list of
    {input: array}, `polygraphy run <onnx> --load-inputs <file>`).

    The feeds are the runtime's own inputs, caches included (the caches are fixed-size inputs of the
    graphs, so they dominate: about 2 x layers x kv_heads x capacity x head_dim x 4 bytes per target
    feed). A component whose feeds would pass `max_bytes` is skipped (not in the returned dict).
    Returns {component: path}.
    """
    from polygraphy.json import save_json

    from dream_export.runtime.bundle import Bundle
    from dream_export.targets.bundle_builds import graph_profiles

    manifest = Bundle.open(bundle_dir).manifest
    picker = _FeedPicker(_ranges(graph_profiles(manifest)), per_kind)
    calls = record_calls(bundle_dir, prompts, [{"mode": "tree", "tree": "4,4,16"}, {"mode": "ar"}], max_new_tokens=16,
                         keep=picker, images=[])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Path] = {}
    for graph in sorted({c.graph for c in calls if c.feeds is not None}):
        feeds = [c.feeds for c in calls if c.graph == graph and c.feeds is not None]
        if sum(a.nbytes for f in feeds for a in f.values()) > max_bytes:
            continue
        path = out / f"{graph}.json"
        save_json(feeds, path, description=f"{graph} inputs recorded by the runtime")
        saved[graph] = path
    return saved
