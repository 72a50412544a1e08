"""TensorRT build plans for a bundle: optimization profiles derived from its manifest.

The target engine gets two profiles (prefill up to the longest prompt; verification up to the
bundle's tree limit), the draft engine two (context pass; k-wide tree step), the vision engine one
static shape. Shapes come from the manifest's graph I/O and capacities, never from constants here.
"""

from __future__ import annotations

from dream_export.targets.registry import Target
from dream_export.targets.trtexec import GraphBuild, make_build


def _shape(entry: dict, name: str, sym: dict[str, int]) -> tuple[int, ...]:
    for io in entry["inputs"]:
        if io["name"] == name:
            return tuple(sym[d] if isinstance(d, str) else int(d) for d in io["shape"])
    raise KeyError(name)


def input_shapes(entry: dict, sym: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input of a manifest graph entry, with its symbolic dims set from `sym`."""
    return {io["name"]: _shape(entry, io["name"], sym) for io in entry["inputs"]}


def _profile(entry: dict, lo: dict, opt: dict, hi: dict) -> dict:
    return {io["name"]: (_shape(entry, io["name"], lo), _shape(entry, io["name"], opt), _shape(entry, io["name"], hi))
            for io in entry["inputs"]}


def target_symbols(manifest: dict, tokens: int, rows: int, past: int | None = None) -> dict[str, int]:
    """The target graph's symbolic dims for a call over `tokens` new tokens gathering `rows` logit rows
    after `past` cached ones: the mask spans those (the whole cache, for graphs that read all of it)
    plus the new tokens."""
    cap = manifest["kv_capacity"]
    used = manifest["graphs"]["target"].get("slots") == "used"
    return {"tokens": tokens, "slots": (cap if past is None or not used else past) + tokens, "rows": rows}


def draft_symbols(manifest: dict, tokens: int, feats: int) -> dict[str, int]:
    """The draft graph's symbolic dims for `tokens` positions appending `feats` target features."""
    return {"tokens": tokens, "self_slots": manifest["draft_capacity"] + tokens, "feats": feats,
            "cross_slots": manifest["cross_capacity"] + feats}


def graph_profiles(manifest: dict, max_prompt: int | None = None, tree_k: int = 8) -> dict[str, list[dict]]:
    """Optimization profiles per component, as {input: (min, opt, max)} dicts."""
    g = manifest["graphs"]
    cap, tree = manifest["kv_capacity"], manifest["max_tree"]
    prompt = min(max_prompt or cap, cap)
    t = g["target"]

    def tsym(tokens, rows, past=None):
        return target_symbols(manifest, tokens, rows, past)

    # the mask spans the context (from an empty cache to a full one) where the graph reads only that
    target = [_profile(t, tsym(1, 1, 0), tsym(prompt // 2, 1, 0), tsym(prompt, 1, cap - prompt)),  # prefill
              _profile(t, tsym(1, 1, 0), tsym(tree // 2, tree // 2, cap // 2), tsym(tree, tree, cap))]  # decode
    d = g["draft"]

    def dsym(tokens, feats):
        return draft_symbols(manifest, tokens, feats)

    draft = [_profile(d, dsym(1, 0), dsym(prompt // 2, prompt // 2), dsym(prompt, prompt)),  # context pass
             _profile(d, dsym(1, 1), dsym(tree_k // 2, tree_k // 2), dsym(tree_k, tree_k))]  # tree step
    v = g["vision"]
    vision = [_profile(v, {}, {}, {})]
    return {"vision": vision, "target": target, "draft": draft}


def bundle_builds(manifest: dict, target: Target, precision: str, *, max_prompt: int | None = None,
                  dla_core: int | None = None, workspace_mb: int | None = None, timing_cache: str | None = None,
                  opt_level: int | None = None) -> list[GraphBuild]:
    """One `GraphBuild` per component of the bundle for `target` (DLA only for the vision tower)."""
    profiles = graph_profiles(manifest, max_prompt)
    return [make_build(c, precision, target, profiles[c], dla_core=dla_core if c == "vision" else None,
                       workspace_mb=workspace_mb, timing_cache=timing_cache, builder_optimization_level=opt_level)
            for c in ("vision", "target", "draft")]
