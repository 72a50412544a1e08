"""Numerical parity of a bundle's ONNX graphs (each precision variant) against the torch modules.

Every graph runs in ONNX Runtime (CPU) and as the torch module it was exported from
(`export/graphs.py`, built here the way `export_bundle` builds them) on the same feeds:

* random feeds per seed (random masks with each row seeing itself, random caches and positions);
* realistic feeds: the caller's first (image, prompt) sample through the target's processor and chat
  template (vision); a causal prefill of that prompt with the image features spliced in, then a tree
  verification over the prefilled cache with an ancestor mask (target); the draft's context pass over the target's features, then a tree
  step with ancestor masks on its self- and cross-attention (draft).

Per output the report gives the max absolute error and the max error relative to the output's scale
(max |reference|). `topk_ids` are judged by what they select, not by identity (near-ties may swap):
the error is |reference log-prob of the id ONNX Runtime chose − reference k-th log-prob|, relative to
the log-probs' scale. Tolerances (relative to scale): see `TOLERANCE`.

FP16 policy (what decides, and why):

* realistic feeds (the states decoding really produces) must agree within `TOLERANCE["fp16"]`;
* random feeds (unit-variance random caches over every slot, random masks) are a stress test: FP16
  error compounds through the layers on states real decoding never produces (measured on the demo:
  up to 0.16 of scale on `attn_importance`, 0.10 on `new_key`, while realistic feeds stay below 5e-3).
  They are graded with `STRESS_TOLERANCE`, which still catches a wrong or corrupted weight (errors of
  order 1) but not FP16's rounding;
* greedy agreement decides what a user sees: each reduced-precision variant decodes the caller's
  samples (up to `GREEDY_PROMPTS`) greedily next to fp32; it passes when at least `GREEDY_MIN` of the
  outputs are identical or every divergence sits on a near-tie of the fp32 logits (gap <=
  `GREEDY_TIE`), which no FP16 graph can be expected to reproduce.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dream_export.core.graph_spec import spec
from dream_export.errors import UsageError
from dream_export.export.compare import scaled_error
from dream_export.export.feeds import TREE_PARENTS, ancestors, depths, ort_session
from dream_export.export.sources import source_dir
from dream_export.io import atomic_write_text
from dream_export.runtime.bundle import GRAPHS
from dream_export.runtime.masks import prefill_mask
from dream_export.runtime.vision_grid import vision_grid_inputs

# Max error relative to the output's scale. FP32: ONNX Runtime and torch differ only in summation order
# and fused kernels (~1e-6 relative); 1e-3 leaves room for deep models. FP16 keeps ~3 significant
# digits per op (unit roundoff 4.9e-4) and errors compound through the layers and the LM head; 3e-2
# separates that from a real defect (a wrong or corrupted weight gives errors of order 1).
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
# Random-feed stress cases: FP32 is held to its own tolerance; FP16 to 10x its realistic one.
STRESS_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-1}
GREEDY_PROMPTS = 8
GREEDY_MIN = 0.95
GREEDY_TIE = 0.05  # fp32 logit gap under which a divergence is a tie (FP16 logit error ~0.03 on the demo)
GREEDY_TOKENS = 48


# ----------------------------------------------------------------------------------------- modules


class _Modules:
    """The torch graphs of a bundle, built exactly as `export_bundle` builds them."""

    def __init__(self, manifest: dict, target_dir: Path, draft_dir: Path):
        import torch

        from dream_export.draft.target import load_target
        from dream_export.draft.train import load_draft, load_draft_config
        from dream_export.export.graphs import DraftGraph, TargetGraph, VisionGraph

        torch.manual_seed(0)
        taps = tuple(manifest.get("taps") or ()) or tuple(load_draft_config(draft_dir).fuse_layers)
        self.target = load_target(target_dir, taps=taps)
        self.draft = load_draft(draft_dir, self.target)
        model = self.target.model
        text = model.config.get_text_config()
        outputs = [o["name"] for o in manifest["graphs"]["target"]["outputs"]]
        self.vision = VisionGraph(self.target.vlm).eval()
        self.target_graph = TargetGraph(self.target.side.decoder, model.lm_head, manifest["topk"],
                                        getattr(text, "final_logit_softcapping", None),
                                        importance="attn_importance" in outputs,
                                        tap_norm=bool(manifest.get("taps_norm"))).eval()
        self.draft_graph = DraftGraph(self.draft, model.lm_head, manifest["topk"],
                                      self.draft.config.final_logit_softcapping).eval()
        self.processor = self.target.processor
        self.embed = self.target.side.embed_tokens

    def run(self, name: str, feeds: dict[str, np.ndarray], arg_names: list[str]) -> list[np.ndarray]:
        """Reference outputs of graph `name` for `feeds` (inputs ONNX pruned are fed as zeros; optional trailing
        inputs a family's graph does not take, e.g. the vision grid's bookkeeping, are absent from `feeds`)."""
        import torch

        module = {"vision": self.vision, "target": self.target_graph, "draft": self.draft_graph}[name]
        with torch.no_grad():
            out = module(*[torch.from_numpy(feeds[a]) for a in arg_names if a in feeds])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().numpy() for o in out]

    def logprobs(self, name: str, ref: dict) -> np.ndarray | None:
        """Reference full-vocabulary log-probs of the rows `topk_ids` ranks (to judge tie swaps)."""
        import torch

        from dream_export.draft.model import soft_cap

        with torch.no_grad():
            if name == "target":
                logits = torch.from_numpy(ref["row_logits"])
            elif name == "draft":
                logits = soft_cap(self.draft_graph.lm_head(torch.from_numpy(ref["feature"][0])),
                                  self.draft_graph.softcap)
            else:
                return None
            return torch.log_softmax(logits.float(), -1).numpy()


# ------------------------------------------------------------------------------------------- feeds


def _arg_names(name: str) -> list[str]:
    """The torch module's arguments: every input of the graph's spec (ONNX may have pruned some)."""
    return spec(name).input_names()


def _taps_width(m: dict) -> int:
    """Width of the target's concatenated layer taps (EAGLE-3's `prev_taps`; a hidden width without taps)."""
    return m["dims"]["hidden"] * max(1, len(m.get("taps") or ()))


def _random_feeds(name: str, m: dict, rng: np.random.Generator, emb_std: float) -> dict[str, np.ndarray]:
    """Random feeds of the graph's shapes; every query row sees at least itself."""
    d = m["dims"]
    h, f32 = d["hidden"], np.float32
    if name == "vision":
        # batch 1: the runtime encodes one image per call (and the exported vision graphs of some
        # families bake the batch size into a Split despite the symbolic 'batch' axis); an image of dynamic
        # size (Pixtral) is 2 × 3 merged patches
        v = m.get("vision") or {}
        pixels = m["graphs"]["vision"]["inputs"][0]["shape"]
        if v.get("layout") == "grid":  # a 2 × 3-unit patch grid (two windows) and its bookkeeping
            grid = [[1, 2 * v["merge"], 3 * v["merge"]]]
            return {"pixel_values": rng.standard_normal((int(np.prod(grid)), pixels[-1])).astype(f32),
                    **vision_grid_inputs(grid, v["merge"], v["window"])}
        step = v.get("step", 1)
        sides = {"height": 2 * step, "width": 3 * step}
        shape = [s if isinstance(s, int) else sides.get(s, 1) for s in pixels]
        return {"pixel_values": rng.standard_normal(shape).astype(f32)}
    t = 5
    if name == "target":
        cap = m["kv_capacity"]
        kv = (d["layers"], 1, d["kv_heads"], cap, d["head_dim"])
        mask = rng.random((1, t, cap + t)) < 0.5
        mask[0, :, cap:] |= np.eye(t, dtype=bool)
        return {"inputs_embeds": (rng.standard_normal((1, t, h)) * emb_std).astype(f32),
                "position_ids": np.sort(rng.integers(0, cap, (_rope_axes(m), t))).astype(np.int64),
                "attention_mask": mask, "past_key": rng.standard_normal(kv).astype(f32),
                "past_value": rng.standard_normal(kv).astype(f32),
                "logit_rows": np.sort(rng.choice(t, 3, replace=False)).astype(np.int64)}
    dcap, ccap, nf = m["draft_capacity"], m["cross_capacity"], 3
    skv = (d["draft_blocks"], 1, d["draft_kv_heads"], dcap, d["draft_head_dim"])
    ckv = (1, d["draft_kv_heads"], ccap, d["draft_head_dim"])
    self_mask = rng.random((1, t, dcap + t)) < 0.5
    self_mask[0, :, dcap:] |= np.eye(t, dtype=bool)
    return {"embeds": (rng.standard_normal((1, t, h)) * emb_std).astype(f32),
            "positions": np.sort(rng.integers(0, dcap, (1, t))).astype(np.int64), "self_mask": self_mask,
            "self_key": rng.standard_normal(skv).astype(f32), "self_value": rng.standard_normal(skv).astype(f32),
            "cross_key": rng.standard_normal(ckv).astype(f32), "cross_value": rng.standard_normal(ckv).astype(f32),
            "new_feats": rng.standard_normal((1, nf, h)).astype(f32),
            "cross_mask": rng.random((1, t, ccap + nf)) < 0.5,
            "prev_feat": rng.standard_normal((1, t, h)).astype(f32),
            "prev_taps": rng.standard_normal((1, t, _taps_width(m))).astype(f32)}


def _rope_axes(m: dict) -> int:
    """Rows of the target's position_ids: 3 for mRoPE (temporal, height, width), else 1."""
    return 3 if m.get("decoder", {}).get("rope") == "mrope" else 1


def image_layout(m: dict, vlm):
    """The bundle's image layout (`runtime.image_layout`), the tensors it names read from the loaded model."""
    from dream_export.runtime.image_layout import ImageLayout

    return ImageLayout.from_manifest(m, {k: v.numpy() for k, v in vlm.vision_layout()[1].items()})


class _Realistic:
    """Realistic feeds, built in order: vision → target prefill → target tree → draft context → draft tree.

    Later feeds use the *reference* outputs of earlier ones (features, KV rows), so every variant is
    compared on identical inputs.
    """

    def __init__(self, mods: _Modules, m: dict, sample: tuple):
        self.mods, self.m = mods, m
        self.cases: dict[str, dict[str, dict[str, np.ndarray]]] = {g: {} for g in GRAPHS}
        self._build(*sample)

    def _build(self, image, prompt: str) -> None:
        import torch

        from dream_export.core.prompts import PromptEncoder, adds_special_tokens

        mods, m = self.mods, self.m
        proc = mods.processor
        text = PromptEncoder(proc).prompt_text(prompt)
        enc = proc(text=text, images=image, return_tensors="pt", add_special_tokens=adds_special_tokens(proc.tokenizer, text))
        # the processor's pixels, cut into the vision graph's views and its rows laid out as the runtime does
        layout = image_layout(m, mods.target.vlm)
        inputs = {k: v.float().numpy() if k == "pixel_values" else v.numpy() for k, v in enc.items()}
        feeds = layout.feeds(inputs, 0)
        self.cases["vision"]["realistic"] = feeds
        (views,) = mods.run("vision", feeds, _arg_names("vision"))
        img_emb = layout.pack(views, inputs, 0)

        # target prefill: the prompt's embeddings with the image features spliced in, the family's prefill mask
        n_tree = len(TREE_PARENTS)
        cap = m["kv_capacity"]
        ids = enc["input_ids"][0][: cap - n_tree]
        with torch.no_grad():
            emb = mods.embed(ids[None]).float().numpy()  # the HF module applies the family's scale
        is_img = (ids == m["tokens"]["image_token_id"]).numpy()
        emb[0, is_img] = img_emb.reshape(-1, img_emb.shape[-1])[: int(is_img.sum())]
        p = emb.shape[1]
        d = m["dims"]
        kv = (d["layers"], 1, d["kv_heads"], cap, d["head_dim"])
        mask = np.zeros((1, p, cap + p), bool)
        mask[0, :, cap:] = prefill_mask(is_img, m.get("decoder", {}).get("image_blocks_bidirectional", False))
        # 1-D positions for every axis of mRoPE too: graph against module, any positions will do (the
        # runtime's 3-D ones are checked against the HF forward, `hf_parity`)
        rope = _rope_axes(m)
        prefill = {"inputs_embeds": emb.astype(np.float32), "position_ids": np.tile(np.arange(p), (rope, 1)),
                   "attention_mask": mask, "past_key": np.zeros(kv, np.float32),
                   "past_value": np.zeros(kv, np.float32), "logit_rows": np.array([p - 1])}
        self.cases["target"]["realistic-prefill"] = prefill
        ref = dict(zip(_output_names(m, "target"), mods.run("target", prefill, _arg_names("target")), strict=True))

        # target tree verification over the committed prefix
        anc = ancestors(TREE_PARENTS)
        tree_ids = np.random.default_rng(7).integers(0, d["vocab"], n_tree)
        with torch.no_grad():
            tree_emb = mods.embed(torch.from_numpy(tree_ids)[None]).float().numpy()
        past_k, past_v = np.zeros(kv, np.float32), np.zeros(kv, np.float32)
        past_k[..., :p, :], past_v[..., :p, :] = ref["new_key"], ref["new_value"]
        tmask = np.zeros((1, n_tree, cap + n_tree), bool)
        tmask[0, :, :p] = True
        tmask[0, :, cap:] = anc
        self.cases["target"]["realistic-tree"] = {
            "inputs_embeds": tree_emb, "position_ids": np.tile(p + depths(TREE_PARENTS), (rope, 1)),
            "attention_mask": tmask,
            "past_key": past_k, "past_value": past_v, "logit_rows": np.arange(n_tree)}

        # draft context pass: the prompt's embeddings, the target's features; query i sees features < i
        dcap, ccap = m["draft_capacity"], m["cross_capacity"]
        skv = (d["draft_blocks"], 1, d["draft_kv_heads"], dcap, d["draft_head_dim"])
        ckv = (1, d["draft_kv_heads"], ccap, d["draft_head_dim"])
        smask = np.zeros((1, p, dcap + p), bool)
        smask[0, :, dcap:] = np.tril(np.ones((p, p), bool))
        cmask = np.zeros((1, p, ccap + p), bool)
        cmask[0, :, ccap:] = np.tril(np.ones((p, p), bool), -1)
        # EAGLE-style drafts read each position's predecessor, the target's row one back (zero before the
        # first): its final feature, or for EAGLE-3 its taps (then prev_feat is zero)
        def back(x: np.ndarray) -> np.ndarray:
            return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], 1).astype(np.float32)

        eagle3 = (m.get("draft") or {}).get("eagle3_taps", False)
        prev_feat = np.zeros_like(emb, np.float32) if eagle3 else back(ref["hidden"])
        prev_taps = back(ref["taps"]) if eagle3 else np.zeros((1, p, _taps_width(m)), np.float32)
        ctx = {"embeds": emb.astype(np.float32), "positions": np.arange(p)[None], "self_mask": smask,
               "self_key": np.zeros(skv, np.float32), "self_value": np.zeros(skv, np.float32),
               "cross_key": np.zeros(ckv, np.float32), "cross_value": np.zeros(ckv, np.float32),
               "new_feats": ref["hidden"].astype(np.float32), "cross_mask": cmask,
               "prev_feat": prev_feat, "prev_taps": prev_taps}
        self.cases["draft"]["realistic-context"] = ctx
        dref = dict(zip(_output_names(m, "draft"), mods.run("draft", ctx, _arg_names("draft")), strict=True))

        # draft tree step: committed self/cross rows visible; the tree's own rows and its predicted
        # features (appended to the cross keys/values) under the ancestor mask
        sk, sv = np.zeros(skv, np.float32), np.zeros(skv, np.float32)
        sk[..., :p, :], sv[..., :p, :] = dref["new_self_key"], dref["new_self_value"]
        ck, cv = np.zeros(ckv, np.float32), np.zeros(ckv, np.float32)
        ck[..., :p, :], cv[..., :p, :] = dref["new_cross_key"], dref["new_cross_value"]
        smask = np.zeros((1, n_tree, dcap + n_tree), bool)
        smask[0, :, :p] = True
        smask[0, :, dcap:] = anc
        cmask = np.zeros((1, n_tree, ccap + n_tree), bool)
        cmask[0, :, :p] = True
        cmask[0, :, ccap:] = anc & ~np.eye(n_tree, dtype=bool)  # a node sees its ancestors' predicted features
        feats = dref["feature"][:, np.resize(np.arange(p), n_tree)].astype(np.float32)
        self.cases["draft"]["realistic-tree"] = {
            "embeds": tree_emb, "positions": (p + depths(TREE_PARENTS))[None], "self_mask": smask,
            "self_key": sk, "self_value": sv, "cross_key": ck, "cross_value": cv, "new_feats": feats,
            # tree nodes read draft features as their predecessors (EAGLE-style drafts), no taps
            "cross_mask": cmask, "prev_feat": feats, "prev_taps": np.zeros((1, n_tree, _taps_width(m)), np.float32)}


def _output_names(m: dict, name: str) -> list[str]:
    return [o["name"] for o in m["graphs"][name]["outputs"]]


# ----------------------------------------------------------------------------------------- compare


def _compare(out_name: str, ort: np.ndarray, ref: np.ndarray, tol: float, lp: np.ndarray | None,
             ref_all: dict) -> dict:
    """Error of one output: max abs, max relative to scale, verdict."""
    if out_name == "topk_ids" and lp is not None:
        # judge the chosen ids by their reference log-probs (a swap between tied candidates is no error)
        chosen = np.take_along_axis(lp, ort.astype(np.int64), -1)
        kth = ref_all["topk_logprobs"]
        err = np.abs(chosen - kth)
        scale = float(np.max(np.abs(kth))) or 1.0
        res = {"max_abs": float(err.max(initial=0.0)), "scale": scale,
               "id_agreement": float(np.mean(ort == ref))}
    else:
        if ort.shape != ref.shape:
            return {"ok": False, "message": f"shape {list(ort.shape)} != reference {list(ref.shape)}", "tol": tol}
        res = scaled_error(ort, ref, tol, out_name)
        if not np.isfinite(res["rel"]):
            res.update(tol=tol, message="non-finite values")
            return res
    res["rel"] = res["max_abs"] / max(res["scale"], 1e-12)
    res["tol"] = tol
    res["ok"] = bool(res["rel"] <= tol)
    return res


def _tolerance(variant: str, case: str) -> float:
    """Realistic feeds decide at `TOLERANCE`; random stress feeds at `STRESS_TOLERANCE` (see module docstring)."""
    return STRESS_TOLERANCE[variant] if case.startswith("random") else TOLERANCE[variant]


def greedy_agreement(bundle_dir: str | Path, variant: str, samples: Sequence[tuple],
                     max_new_tokens: int = GREEDY_TOKENS) -> dict:
    """Greedy outputs of `variant` vs fp32 through the runtime on `samples` ((PIL image, prompt)), the
    deciding check.

    Returns `agreement` (share of identical outputs), `first_divergence` (token index per differing
    prompt), `ties` (whether each divergence is a near-tie of fp32's logits) and `ok`.
    """
    from dream_export.core.ties import first_divergence, tie_explained
    from dream_export.errors import DreamExportError
    from dream_export.runtime.backends import OnnxRuntimeBackend
    from dream_export.runtime.bundle import Bundle
    from dream_export.runtime.pipeline import Pipeline

    bundle = Bundle.open(bundle_dir)
    ref_files, var_files = {}, {}
    for g in GRAPHS:
        entry, primary = bundle.graph(g), bundle.manifest.get("precision", {}).get(g, "fp32")
        # plain bundles carry variants beside `file`; calibrated ones run the variant as `file`
        ref_files[g] = bundle.root / (entry.get("fp32_file") or entry["file"])
        rel = entry["file"] if primary == variant else entry.get("variants", {}).get(variant, {}).get("file")
        if rel is None:
            return {"ok": True, "skipped": f"no {variant} {g} graph", "agreement": None}
        var_files[g] = bundle.root / rel
    ref = Pipeline(bundle, OnnxRuntimeBackend(bundle, 1, graph_files=ref_files))
    var = Pipeline(bundle, OnnxRuntimeBackend(bundle, 1, graph_files=var_files))
    same, firsts, ties = 0, [], []
    try:
        for image, prompt in samples:
            a = ref.generate(image, prompt, max_new_tokens=max_new_tokens, mode="ar").tokens
            b = var.generate(image, prompt, max_new_tokens=max_new_tokens, mode="ar").tokens
            if a == b:
                same += 1
                continue
            firsts.append(first_divergence(a, b))
            ties.append(bool(tie_explained(ref, image, prompt, a, b, GREEDY_TIE)))
    except DreamExportError as e:  # e.g. a bundle whose KV capacity cannot hold a prompt
        return {"ok": True, "skipped": str(e), "agreement": None}
    prompts = len(samples)
    agreement = same / prompts
    ok = agreement >= GREEDY_MIN or all(ties)
    msg = (f"greedy output identical to fp32 on {same}/{prompts} prompts (< {GREEDY_MIN:.0%}) and "
           f"{ties.count(False)} divergence(s) are not near-ties")
    return {"ok": ok, "agreement": agreement, "prompts": prompts, "first_divergence": firsts, "ties": ties,
            "min_agreement": GREEDY_MIN, "tie_gap": GREEDY_TIE, **({} if ok else {"message": msg})}


def compare_graphs(ref_path: str | Path, path: str | Path, feeds: list[dict[str, np.ndarray]], variant: str,
                   threads: int = 1) -> dict:
    """Run a converted graph and its fp32 source in ONNX Runtime on the same feeds (e.g. recorded from the
    runtime); per float output the worst error relative to scale, per integer output the agreement."""
    a, b = ort_session(Path(ref_path), threads), ort_session(Path(path), threads)
    names = [o.name for o in a.get_outputs()]
    have = {i.name for i in a.get_inputs()}
    tol = TOLERANCE[variant]
    worst: dict[str, float] = {}
    agree: dict[str, list[float]] = {}
    for f in feeds:
        feed = {k: v for k, v in f.items() if k in have}
        for n, x, y in zip(names, a.run(names, feed), b.run(names, feed), strict=True):
            if np.issubdtype(x.dtype, np.integer):
                agree.setdefault(n, []).append(float(np.mean(x == y)))
                continue
            worst[n] = max(worst.get(n, 0.0), scaled_error(y, x, tol, n)["rel"])
    return {"ok": all(v <= tol for v in worst.values()), "tolerance": tol, "cases": len(feeds), "max_rel": worst,
            "id_agreement": {n: float(np.mean(v)) for n, v in agree.items()}}


def _variant_files(m: dict, name: str) -> dict[str, str]:
    """Precision variant → file (relative to the bundle) of graph `name`.

    A calibrated bundle (`dream-export calibrate`) runs a converted graph as `file` and keeps the
    exported one as `fp32_file`; INT8 graphs are judged by `calib-report`, not elementwise here.
    """
    entry = m["graphs"][name]
    primary = m.get("precision", {}).get(name, "fp32")
    files = {primary: entry["file"], **{k: v["file"] for k, v in entry.get("variants", {}).items()}}
    if primary != "fp32" and entry.get("fp32_file"):
        files["fp32"] = entry["fp32_file"]
    return files


def _hf_forward(root: Path, m: dict, target_dir: Path, samples: Sequence[tuple], variants: tuple[str, ...],
                threads: int) -> dict:
    """The bundle against the HF model's own forward (`hf_parity`), for each variant whose vision and
    target graphs the bundle carries."""
    from dream_export.export.hf_parity import hf_forward_parity

    if not samples:
        return {"ok": True, "skipped": "no (image, prompt) samples given"}
    per_graph = {g: _variant_files(m, g) for g in ("vision", "target")}
    files = {v: {g: per_graph[g][v] for g in per_graph} for v in variants
             if all(v in per_graph[g] and (root / per_graph[g][v]).exists() for g in per_graph)}
    return hf_forward_parity(root, m, target_dir, samples[0], files, threads)


def check_bundle(bundle_dir: str | Path, target_dir: str | Path | None = None, draft_dir: str | Path | None = None,
                 variants: tuple[str, ...] = ("fp32", "fp16"), seeds: tuple[int, ...] = (0, 1),
                 threads: int = 1, log=print, samples: Sequence[tuple] = ()) -> dict:
    """Run every graph of the bundle (each variant present) against its torch module; write
    `reports/parity.json`.

    `samples`: (PIL image, prompt) pairs for the realistic feeds (the first) and the greedy agreement
    of reduced-precision variants (up to `GREEDY_PROMPTS`); without them only random feeds are checked
    and the report's `not_checked` says so. `target_dir`/`draft_dir` default to the source paths the
    manifest records. Returns the report:
    `ok`, `failures` (one line per output beyond tolerance, naming graph, variant, case and output),
    `tolerance`, and per graph → variant → case → output the errors.
    """
    import torch

    root = Path(bundle_dir)
    mpath = root / "manifest.json"
    if not mpath.exists():
        raise UsageError(f"{root} is not a bundle (manifest.json missing)")
    m = json.loads(mpath.read_text())
    target_dir = Path(target_dir or source_dir(m, root, "target"))
    draft_dir = Path(draft_dir or source_dir(m, root, "draft"))
    for which, path in (("target", target_dir), ("draft", draft_dir)):
        if not path.is_dir():
            raise UsageError(f"the bundle's source {which} {path} (recorded relative to the bundle) is not on this "
                             f"machine; pass it with --{which}")
    unknown = [v for v in variants if v not in TOLERANCE]
    if unknown:
        raise UsageError(f"unknown precision variants {unknown}; parity knows {sorted(TOLERANCE)}")

    # Every torch reference first, then the modules go before any ONNX Runtime session opens: the check
    # then holds one fp32 copy of the target at a time (torch's, or a session's), not both.
    mods = _Modules(m, target_dir, draft_dir)
    emb_std = float(mods.embed.weight.detach().float().std())
    realistic = _Realistic(mods, m, samples[0]) if samples else None
    report: dict = {"ok": True, "failures": [], "tolerance": {v: TOLERANCE[v] for v in variants},
                    "seeds": list(seeds), "graphs": {}, "missing_variants": []}
    if not samples:
        report["not_checked"] = {"realistic": "no (image, prompt) samples given: random feeds only, no greedy "
                                              "agreement"}
    graph_cases, refs, lps = {}, {}, {}
    for name in GRAPHS:
        cases = {f"random-seed{s}": _random_feeds(name, m, np.random.default_rng(s), emb_std) for s in seeds}
        cases.update(realistic.cases[name] if realistic else {})
        graph_cases[name] = cases
        args = _arg_names(name)
        refs[name], lps[name] = {}, {}
        for case, feeds in cases.items():
            refs[name][case] = dict(zip(_output_names(m, name), mods.run(name, feeds, args), strict=True))
            lps[name][case] = mods.logprobs(name, refs[name][case])
    del mods, realistic
    gc.collect()
    for name in GRAPHS:
        cases = graph_cases[name]
        primary = m.get("precision", {}).get(name, "fp32")
        files = _variant_files(m, name)
        if primary not in TOLERANCE:
            report.setdefault("not_checked", {})[name] = (f"{primary} graph: judged by `dream-export calib-report` "
                                                          "(greedy agreement, τ, accuracy)")
        report["graphs"][name] = {}
        for var in variants:
            if var not in files or not (root / files[var]).exists():
                report["missing_variants"].append(f"{name}/{var}")
                continue
            sess = ort_session(root / files[var], threads)
            have = [i.name for i in sess.get_inputs()]  # ONNX prunes unused inputs (DREAM: prev_feat)
            out_names = [o.name for o in sess.get_outputs()]
            res: dict = {"file": files[var], "cases": {}}
            for case, feeds in cases.items():
                got = dict(zip(out_names, sess.run(out_names, {k: feeds[k] for k in have}), strict=True))
                ref, lp = refs[name][case], lps[name][case]
                per = {}
                tol = _tolerance(var, case)
                for o in out_names:
                    per[o] = _compare(o, got[o], ref[o], tol, lp, ref)
                    if not per[o]["ok"]:
                        report["ok"] = False
                        report["failures"].append(
                            f"{name}/{var}/{case}: output {o!r} error {per[o].get('rel', float('nan')):.3g} of scale "
                            f"> tolerance {tol:g}" + (f" ({per[o]['message']})" if "message" in per[o] else ""))
                res["cases"][case] = per
            del sess  # before the next variant's session loads
            # without realistic feeds the random ones are all there is to report
            strict = [c for c in cases if _tolerance(var, c) == TOLERANCE[var]] or list(cases)
            stress = [c for c in cases if c not in strict]
            res["max_rel"] = {o: max(res["cases"][c][o].get("rel", float("inf")) for c in strict) for o in out_names}
            if stress:
                res["max_rel_stress"] = {o: max(res["cases"][c][o].get("rel", float("inf")) for c in stress)
                                         for o in out_names}
                res["stress_tolerance"] = STRESS_TOLERANCE[var]
            res["ok"] = all(r["ok"] for c in res["cases"].values() for r in c.values())
            report["graphs"][name][var] = res
    report["greedy"] = {}
    for var in variants:
        if var == "fp32" or not samples or any(f"{g}/{var}" in report["missing_variants"] for g in GRAPHS):
            continue
        g = greedy_agreement(root, var, samples[:GREEDY_PROMPTS])
        report["greedy"][var] = g
        if not g["ok"]:
            report["ok"] = False
            report["failures"].append(f"greedy/{var}: {g['message']}")
    # the decisive reference: the checkpoint as transformers runs it, not our decoder re-implementation
    hf = _hf_forward(root, m, target_dir, samples, variants, threads)
    report["hf_forward"] = hf
    if not hf["ok"]:
        report["ok"] = False
        report["failures"] += hf["failures"]
    for var in variants:
        if var in hf:
            log(f"parity against the HF forward ({var}): max error {hf[var]['max_rel']:.2e} of scale "
                f"(tolerance {hf['tolerance'][var]:.0e})")
    report["versions"] = {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}
    atomic_write_text(root / "reports" / "parity.json", json.dumps(report, indent=2))
    log("parity OK" if report["ok"] else "parity FAILED:\n  " + "\n  ".join(report["failures"]))
    return report
