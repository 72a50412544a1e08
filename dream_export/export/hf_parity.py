"""Parity of a bundle against the Hugging Face model's own forward, not against our re-implementation.

The reference is the checkpoint loaded through `from_pretrained` and run by transformers:

* prefill: `model(**processor(...))` on the caller's (image, prompt): its logits at every prompt
  position and its final-norm hidden states (`hidden_states[-1]`), against the bundle's vision graph
  (fed the processor's pixels) spliced into the bundle's embedding table, then the target graph;
* tree verify: a tree of draft tokens after the prompt under an ancestor mask; the reference runs the
  HF decoder stack on prompt + tree with that mask (`families.VLM.decoder_forward`), the bundle runs
  the target graph over the KV rows its own prefill produced.

Errors are max |ONNX − HF| relative to max |HF| per output, for each precision variant the bundle
carries; the graphs decide (everything downstream of them is exact integer work).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dream_export.errors import IncompatibleArtifactError
from dream_export.export.compare import scaled_error
from dream_export.export.feeds import TREE_PARENTS, ancestors, depths, ort_session
from dream_export.runtime.masks import prefill_mask
from dream_export.runtime.positions import mrope_positions

# fp32: ONNX Runtime vs transformers differ only in summation order and fused kernels. fp16: as the
# graph-against-module parity (`parity.TOLERANCE`).
HF_TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}
def _reference(target_dir: Path, image, prompt: str, tree_ids: np.ndarray) -> dict:
    """The HF model's prefill and tree-verify outputs, and the processor's ids and pixels."""
    import torch

    from dream_export.core.prompts import PromptEncoder, adds_special_tokens
    from dream_export.families import load_processor, load_vlm

    vlm = load_vlm(target_dir, dtype=torch.float32)
    proc = load_processor(target_dir)
    text = PromptEncoder(proc).prompt_text(prompt)
    enc = dict(proc(text=text, images=image, return_tensors="pt",
                    add_special_tokens=adds_special_tokens(proc.tokenizer, text)))
    anc, depth = ancestors(TREE_PARENTS), depths(TREE_PARENTS)
    with torch.no_grad():
        out = vlm.model(**enc, output_hidden_states=True)
        ids = enc["input_ids"]
        p, n = ids.shape[1], len(tree_ids)
        extras = {k: v for k, v in enc.items() if k not in ("input_ids", "pixel_values")}
        merged = vlm.merge(ids, enc["pixel_values"], **extras)
        full = torch.cat([merged, vlm.embed_text(torch.from_numpy(tree_ids)[None])], 1)
        mask = torch.zeros(p + n, p + n, dtype=torch.bool)
        mask[:p, :p] = vlm.prefill_mask(ids, **extras)[0]
        mask[p:, :p] = True
        mask[p:, p:] = torch.from_numpy(anc)
        prompt_pos = vlm.position_ids(ids, **extras)  # [1,p], or mRoPE [3,1,p]
        tree_pos = vlm.next_position(prompt_pos) + torch.from_numpy(depth)
        pos = torch.cat([prompt_pos, tree_pos.expand(*prompt_pos.shape[:-1], n)], -1)
        tree = vlm.decoder_forward(full, pos, mask[None]).hidden[:, p:]
        tree_logits = vlm.logits(tree)
    vision_inputs = {k: v.float().numpy() if k == "pixel_values" else v.numpy() for k, v in enc.items()
                     if k != "input_ids" and torch.is_tensor(v)}
    return {"ids": ids[0].numpy(), "vision_inputs": vision_inputs,
            "grids": vision_inputs.get("image_grid_thw"),
            "prefill": {"row_logits": out.logits[0].float().numpy(), "hidden": out.hidden_states[-1].float().numpy()},
            "tree": {"row_logits": tree_logits[0].float().numpy(), "hidden": tree.float().numpy()},
            "tree_mask": anc, "tree_depth": depth}


def _run_bundle(root: Path, m: dict, files: dict[str, str], ref: dict, tree_ids: np.ndarray, threads: int) -> dict:
    """The bundle's prefill and tree-verify outputs (vision + embedding splice + target graph)."""
    from safetensors.numpy import load_file

    from dream_export.runtime.image_layout import ImageLayout

    vision, target = ort_session(root / files["vision"], threads), ort_session(root / files["target"], threads)
    kind = vision.get_inputs()[0].type  # pixel_values first (core.graph_spec.VISION)
    emb = m["embeddings"]
    tensors = load_file(str(root / emb["file"]))
    table = tensors[emb["tensor"]].astype(np.float32) * np.float32(emb.get("scale", 1.0))
    # the processor's pixels through the vision graph, laid out in the prompt as the runtime does
    layout = ImageLayout.from_manifest(m, tensors)
    dtype = np.float16 if "float16" in kind else np.float32
    (feats,) = layout.encode(ref["vision_inputs"], 1, lambda feeds: vision.run(None, {
        k: v.astype(dtype) if k == "pixel_values" else v for k, v in feeds.items()})[0].astype(np.float32))
    ids = ref["ids"]
    x = table[ids][None]
    is_img = ids == m["tokens"]["image_token_id"]
    if int(is_img.sum()) != len(feats):
        raise IncompatibleArtifactError(f"the processor's prompt has {int(is_img.sum())} image tokens, the bundle's image "
                             f"layout gives {len(feats)} rows")
    x[0, is_img] = feats
    d, cap, p, n = m["dims"], m["kv_capacity"], len(ids), len(tree_ids)
    kv = (d["layers"], 1, d["kv_heads"], cap, d["head_dim"])
    have = {i.name for i in target.get_inputs()}
    outs = [o.name for o in target.get_outputs()]

    def run(feeds: dict) -> dict:
        return dict(zip(outs, target.run(outs, {k: v for k, v in feeds.items() if k in have}), strict=True))

    mask = np.zeros((1, p, cap + p), bool)
    mask[0, :, cap:] = prefill_mask(is_img, m.get("decoder", {}).get("image_blocks_bidirectional", False))
    pos = np.arange(p)[None]
    if m.get("decoder", {}).get("rope") == "mrope":  # the runtime's rule, as the pipeline applies it
        pos, _ = mrope_positions(is_img, ref["grids"], m["decoder"]["spatial_merge_size"])
    start = int(pos.max()) + 1
    pre = run({"inputs_embeds": x, "position_ids": pos, "attention_mask": mask,
               "past_key": np.zeros(kv, np.float32), "past_value": np.zeros(kv, np.float32),
               "logit_rows": np.arange(p)})
    past_k, past_v = np.zeros(kv, np.float32), np.zeros(kv, np.float32)
    past_k[..., :p, :], past_v[..., :p, :] = pre["new_key"], pre["new_value"]
    tmask = np.zeros((1, n, cap + n), bool)
    tmask[0, :, :p] = True
    tmask[0, :, cap:] = ref["tree_mask"]
    tree_pos = np.broadcast_to(start + ref["tree_depth"], (len(pos), n))
    tree = run({"inputs_embeds": table[tree_ids][None], "position_ids": tree_pos,
                "attention_mask": tmask, "past_key": past_k, "past_value": past_v, "logit_rows": np.arange(n)})
    return {"prefill": pre, "tree": tree}


def hf_forward_parity(root: str | Path, m: dict, target_dir: str | Path, sample: tuple,
                      variant_files: dict[str, dict[str, str]], threads: int = 1) -> dict:
    """Max errors of the bundle against the HF forward on `sample` ((PIL image, prompt)), per variant
    (`variant_files`: variant → graph → file relative to the bundle). Returns `ok`, `tolerance`,
    `failures`, and per variant `max_rel` (worst over outputs and cases) and per case and output the
    relative and absolute errors."""
    root = Path(root)
    image, prompt = sample
    tree_ids = np.random.default_rng(7).integers(0, m["dims"]["vocab"], len(TREE_PARENTS))
    ref = _reference(Path(target_dir), image, prompt, tree_ids)
    if len(ref["ids"]) + len(tree_ids) > m["kv_capacity"]:
        return {"ok": True, "skipped": f"the sample's prompt ({len(ref['ids'])} tokens) and a tree exceed the "
                                       f"bundle's KV capacity {m['kv_capacity']}"}
    report: dict = {"ok": True, "tolerance": {}, "failures": [], "reference": "transformers model(...) forward"}
    for var, files in variant_files.items():
        tol = HF_TOLERANCE[var]
        got = _run_bundle(root, m, files, ref, tree_ids, threads)
        cases = {}
        for case in ("prefill", "tree"):
            cases[case] = {}
            for out in ("row_logits", "hidden"):
                a = got[case][out]
                r = scaled_error(a, ref[case][out].reshape(a.shape), tol, out)
                rel = r["rel"]
                cases[case][out] = {"max_abs": r["max_abs"], "rel": rel}
                if not rel <= tol:
                    report["ok"] = False
                    report["failures"].append(f"hf-forward/{var}/{case}: {out} error {rel:.3g} of scale > {tol:g}")
        report["tolerance"][var] = tol
        report[var] = {"max_rel": max(c[o]["rel"] for c in cases.values() for o in c), "cases": cases}
    return report
