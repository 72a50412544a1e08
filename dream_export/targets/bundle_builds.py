"""TensorRT build plans for a bundle: optimization profiles derived from its manifest.

The profiles cover exactly the shapes the runtime (`dream_export.runtime.engine`) sends, and no more:

- Graphs exported to read only the used cache slots (`"slots": "used"`) get masks over the used slots
  rounded up to `SLOT_BUCKET` (at least one bucket, at most the capacity) plus the call's new rows, so a
  mask spans `bucket + tokens` (prefill: an empty cache still gets one bucket) up to `capacity + tokens`.
  Graphs that read the whole cache get `capacity + tokens` on every call.
- Target: a prefill profile (1 .. the longest prompt, `kv_capacity - 1` tokens, one logit row) and a
  decode profile (1 .. `max_tree` tokens and rows: plain decoding, chain and tree verification).
- Draft: a context-pass profile (the prompt's tokens + the first answer token, all prompt features) and
  a tree-step profile (1 .. `topk` frontier rows, one step's parent features).
- Vision: its one static shape; Qwen2.5-VL's dynamic patch grid from the fewest to the most merged units
  its preprocessing's pixel limits allow (`vision_symbols`).

The optional `draft_chain` graph gets no engine: the TensorRT backend runs chains as per-step draft
calls (`TensorRTBackend.graphs`). The graph's embedding-table input (vocab x hidden, 0.5 GB in fp32
for a 7B model) would be one more engine input to map, and its step count is fixed at export while
TensorRT calls cost microseconds to launch: the unrolled graph pays on the CPU, where a call costs
a session run.
"""

from __future__ import annotations

from dream_export.core.graph_spec import input_shapes
from dream_export.runtime.masks import mask_width
from dream_export.targets.registry import Target
from dream_export.targets.trtexec import GraphBuild, make_build


def _profile(entry: dict, lo: dict, opt: dict, hi: dict) -> dict:
    shapes = [input_shapes(entry, sym) for sym in (lo, opt, hi)]
    return {name: tuple(s[name] for s in shapes) for name in shapes[0]}


def target_symbols(manifest: dict, tokens: int, rows: int, past: int | None = None) -> dict[str, int]:
    """The target graph's symbolic dims for a call over `tokens` new tokens gathering `rows` logit rows
    after `past` cached ones (None: a full cache). The mask spans the cache slots the graph reads plus
    the new tokens."""
    cap = manifest["kv_capacity"]
    used = manifest["graphs"]["target"].get("slots") == "used"
    return {"tokens": tokens, "slots": mask_width(cap, cap if past is None else past, used) + tokens, "rows": rows}


def draft_symbols(manifest: dict, tokens: int, feats: int, self_past: int | None = None,
                  cross_past: int | None = None) -> dict[str, int]:
    """The draft graph's symbolic dims for `tokens` positions appending `feats` target features after
    `self_past` / `cross_past` cached rows (None: full caches)."""
    used = manifest["graphs"]["draft"].get("slots") == "used"
    dcap, ccap = manifest["draft_capacity"], manifest["cross_capacity"]
    return {"tokens": tokens, "feats": feats,
            "self_slots": mask_width(dcap, dcap if self_past is None else self_past, used) + tokens,
            "cross_slots": mask_width(ccap, ccap if cross_past is None else cross_past, used) + feats}


def vision_symbols(manifest: dict) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(min, opt, max) symbolic dims of the vision graph: none for a static one. Qwen2.5-VL ("grid" layout)
    resizes every image to whole merged units (`patch_size × merge` px a side) with an area between the
    preprocessing's `shortest_edge` and `longest_edge` pixels (its min/max pixels)."""
    v = manifest.get("vision") or {}
    if v.get("layout") != "grid":
        return {}, {}, {}
    pre, merge = manifest["preprocess"], v["merge"]
    unit_px = (pre["patch_size"] * merge) ** 2
    lo, hi = max(1, -(-pre["size"]["shortest_edge"] // unit_px)), max(1, pre["size"]["longest_edge"] // unit_px)
    return tuple({"units": u, "patches": u * merge * merge} for u in (lo, (lo + hi) // 2, hi))


def longest_prompt(manifest: dict, max_prompt: int | None = None) -> int:
    """The longest prompt the runtime prefills: one slot stays free for the first answer token."""
    cap = manifest["kv_capacity"]
    return max(1, min(max_prompt or cap - 1, cap - 1))


def graph_profiles(manifest: dict, max_prompt: int | None = None) -> dict[str, list[dict]]:
    """Optimization profiles per component, as {input: (min, opt, max)} dicts (see the module doc)."""
    g = manifest["graphs"]
    cap, tree, topk = manifest["kv_capacity"], manifest["max_tree"], manifest["topk"]
    prompt = longest_prompt(manifest, max_prompt)
    t = g["target"]

    def tsym(tokens, rows, past):
        return target_symbols(manifest, tokens, rows, past)

    target = [_profile(t, tsym(1, 1, 0), tsym(max(1, prompt // 2), 1, 0), tsym(prompt, 1, 0)),  # prefill
              _profile(t, tsym(1, 1, 1), tsym(max(1, tree // 2), max(1, tree // 2), cap // 2),
                       tsym(tree, tree, None))]  # decode / verify
    d = g["draft"]
    uses_cross = manifest.get("draft", {}).get("uses_cross", True)
    f0 = 1 if uses_cross else 0  # EAGLE-style drafts append no target features

    def dsym(tokens, feats, past):
        return draft_symbols(manifest, tokens, feats if uses_cross else 0, past, past)

    # context pass: the first round runs the whole prompt (+ the first answer token) over every prompt
    # feature; later rounds run the accepted tokens (at most a tree's depth) over as many features
    ctx_tokens = min(prompt + 1, manifest["draft_capacity"])
    ctx_feats = min(max(prompt, tree), manifest["cross_capacity"])
    step = min(topk, tree)
    draft = [_profile(d, dsym(1, f0, 0), dsym(max(1, ctx_tokens // 2), max(f0, ctx_feats // 2), cap // 2),
                      draft_symbols(manifest, ctx_tokens, ctx_feats if uses_cross else 0)),
             _profile(d, dsym(1, f0, 1), dsym(max(1, step // 2), max(f0, step // 2), cap // 2),
                      draft_symbols(manifest, step, step if uses_cross else 0))]  # tree / chain step
    v = g["vision"]
    vision = [_profile(v, *vision_symbols(manifest))]
    return {"vision": vision, "target": target, "draft": draft}


def bundle_builds(manifest: dict, target: Target, precision: str, *, max_prompt: int | None = None,
                  dla_core: int | None = None, workspace_mb: int | None = None, timing_cache: str | None = None,
                  opt_level: int | None = None) -> list[GraphBuild]:
    """One `GraphBuild` per component of the bundle for `target` (DLA only for the vision tower)."""
    profiles = graph_profiles(manifest, max_prompt)
    return [make_build(c, precision, target, profiles[c], dla_core=dla_core if c == "vision" else None,
                       workspace_mb=workspace_mb, timing_cache=timing_cache, builder_optimization_level=opt_level)
            for c in ("vision", "target", "draft")]
