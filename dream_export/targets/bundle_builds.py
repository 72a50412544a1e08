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
- Vision: its one static shape, or a dynamic graph's views, image size or patch grid from the fewest to
  the most its preprocessing's limits produce, opt at a typical photo (`vision_symbols`).

The optional `draft_chain` graph gets no engine: the TensorRT backend runs chains as per-step draft
calls (`TensorRTBackend.graphs`). The graph's embedding-table input (vocab x hidden, 0.5 GB in fp32
for a 7B model) would be one more engine input to map, and its step count is fixed at export while
TensorRT calls cost microseconds to launch: the unrolled graph pays on the CPU, where a call costs
a session run.
"""

from __future__ import annotations

from dream_export.core.graph_spec import input_shapes
from dream_export.errors import UsageError
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


# The optimization profiles' opt image: a VGA photo (height, width), the most common aspect ratio.
TYPICAL_IMAGE = (480, 640)


def image_symbols(manifest: dict, height: int, width: int) -> dict[str, int]:
    """The vision graph's symbolic dims for one image of (height, width) pixels, from the preprocessing's
    geometry alone (the sizes `runtime.preprocess` resizes, tiles or crops the image to): none for a
    static graph."""
    from dream_export.runtime import preprocess as pp

    v, pre = manifest.get("vision") or {}, manifest["preprocess"]
    kind = v.get("layout")
    if kind == "anyres":  # the base view + the tiles of the best grid pinpoint
        h, w = pp.select_best_resolution((height, width), v["pinpoints"])
        return {"views": 1 + (h // v["tile"]) * (w // v["tile"])}
    if kind == "split":  # the crops of the image fitted to the longest edge, + the global view
        crop = int(pre["max_image_size"]["longest_edge"])
        if not pre.get("do_image_splitting", True):
            return {"views": 1}
        h, w = pp.crop_multiple(*pp.idefics3_fit(height, width, int(pre["size"]["longest_edge"])), crop)
        return {"views": (h // crop) * (w // crop) + 1 if h > crop or w > crop else 1}
    if kind == "rows":  # one view at its own size, whole patches
        h, w = pp.ImagePreprocessor.from_dict(pre).output_size(height, width)
        return {"height": h, "width": w}
    if kind == "grid":
        h, w = pp.ImagePreprocessor.from_dict(pre).output_size(height, width)
        units = (h // pre["patch_size"] // v["merge"]) * (w // pre["patch_size"] // v["merge"])
        return {"units": units, "patches": units * v["merge"] ** 2}
    return {}


def vision_symbols(manifest: dict) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(min, opt, max) symbolic dims of the vision graph, from the preprocessing limits the checkpoint's
    processor config states (recorded in the manifest's `preprocess` and `vision`); none for a static
    graph. opt is a typical photo (`TYPICAL_IMAGE`); min / max the fewest / most the processor produces:

    - "anyres" (LLaVA-NeXT) `views`: the base view + the fewest / most tiles of an `image_grid_pinpoints` entry.
    - "split" (Idefics3) `views`: an image's longest edge is resized to `size.longest_edge` (L) and its sides
      rounded up to whole `max_image_size` crops (S): n = ceil(L / S) crops along it, 1 .. n across,
      + the global view (a single view when n is 1 or splitting is off).
    - "rows" (Pixtral) `height` / `width`: never enlarged, shrunk to fit `size.longest_edge` (or
      height/width), rounded up to whole `patch_size`: one patch .. the limit rounded up to whole patches.
    - "grid" (Qwen2.5-VL) `units` / `patches`: images are resized to whole merged units (`patch_size ×
      merge` px a side) with an area between the `shortest_edge` and `longest_edge` pixels (its min/max
      pixels).
    """
    v, pre = manifest.get("vision") or {}, manifest.get("preprocess") or {}
    kind = v.get("layout")
    if kind not in ("anyres", "split", "rows", "grid"):
        return {}, {}, {}
    opt = image_symbols(manifest, *TYPICAL_IMAGE)
    if kind == "anyres":
        tiles = [(int(h) // v["tile"]) * (int(w) // v["tile"]) for h, w in v["pinpoints"]]
        return {"views": 1 + min(tiles)}, opt, {"views": 1 + max(tiles)}
    if kind == "split":
        if pre.get("do_resize", True) is False:
            raise UsageError("the Idefics3 preprocessing does not resize images (do_resize false), so its number "
                             "of crops has no bound to build a TensorRT profile for; export with do_resize on")
        # idefics3_fit caps a side at 4096 px
        n = -(-min(int(pre["size"]["longest_edge"]), 4096) // int(pre["max_image_size"]["longest_edge"]))
        if n <= 1 or not pre.get("do_image_splitting", True):
            return {"views": 1}, {"views": 1}, {"views": 1}
        return {"views": n + 1}, opt, {"views": n * n + 1}
    if kind == "rows":
        size, patch = pre["size"], pre["patch_size"]
        if pre.get("do_resize", True) is False:
            raise UsageError("the Pixtral preprocessing does not resize images (do_resize false), so image sizes "
                             "have no bound to build a TensorRT profile for; export with do_resize on")
        limit = (size["longest_edge"],) * 2 if "longest_edge" in size else (size["height"], size["width"])
        ph, pw = patch["height"], patch["width"]
        return ({"height": ph, "width": pw}, opt,
                {"height": -(-int(limit[0]) // ph) * ph, "width": -(-int(limit[1]) // pw) * pw})
    merge = v["merge"]
    unit_px = (pre["patch_size"] * merge) ** 2
    lo, hi = max(1, -(-pre["size"]["shortest_edge"] // unit_px)), max(1, pre["size"]["longest_edge"] // unit_px)
    return tuple({"units": u, "patches": u * merge * merge} for u in (lo, opt["units"], hi))


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
