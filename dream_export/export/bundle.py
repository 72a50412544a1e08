"""`dream-export export`: a (target VLM, draft) pair → a bundle of ONNX graphs + manifest.

The bundle is written into a temporary sibling and renamed at the end, so an interrupted export
never leaves a directory that looks like a bundle.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from dream_export import __version__
from dream_export.core.graph_spec import SPECS, GraphSpec
from dream_export.core.integrity import record
from dream_export.export.sources import check_sources, relative_to_bundle
from dream_export.export.subnet import SupernetExport
from dream_export.io import atomic_dir, file_digest

# 2: graph digests are full sha256 (64 hex digits; format 1 kept 16), so `pairs_with` and calibration
# records compare full digests. Readers refuse older bundles: re-export them.
FORMAT_VERSION = 2
# Opset 16: LayerNormalization (opset 17) has no importer in TensorRT 8.5, so it is exported as basic ops.
OPSET = 16


@dataclass
class ExportOptions:
    """What the user chose on the command line."""

    kv_capacity: int = 512
    max_tree: int = 64
    topk: int = 8
    taps: tuple[int, ...] = ()
    attn_scores: bool = True
    precision: str = "fp32"
    # torch dtype the target loads in: "auto" keeps the checkpoint's own (graphs are traced in fp32
    # either way; a narrower load halves the memory the weights take while loading)
    dtype: str = "auto"
    # greedy steps after the context pass unrolled in the draft_chain graph (0: none); 4: chain depth 5,
    # the fastest on ONNX Runtime CPU (a verify of 6 rows fits the CPU matmul's 6-row block; 7 do not)
    chain_steps: int = 4
    # a supernet draft: export this sub-network ("heads=2,vtc_keep=0.75,layer=22"; None: every head variant)
    subnet: str | None = None


def _io(session_like) -> dict:
    """Manifest I/O entries: name, symbolic shape, dtype (read back from the ONNX model itself)."""
    import onnx

    model = onnx.load(str(session_like), load_external_data=False)
    out = {}
    for kind, vals in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        out[kind] = []
        for v in vals:
            tt = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
            out[kind].append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                              "shape": dims})
    return out


def _graph_entry(onnx_dir: Path, name: str, suffix: str = "") -> dict:
    """Manifest entry of exported graph `name` (file `name + suffix`.onnx)."""
    p = onnx_dir / f"{name}{suffix}.onnx"
    io = _io(p)
    # role -> tensor name over the tensors the graph really has (ONNX prunes unused inputs): the runtime
    # binds by role through this table only
    present = [v["name"] for v in io["inputs"] + io["outputs"]]
    entry = {"file": f"onnx/{name}{suffix}.onnx", "sha256": file_digest(p), **io,
             "bindings": SPECS[name].bindings(present)}
    if name != "vision":
        # target and draft graphs read only the cache slots their masks span (a mask may be as narrow as the
        # used rows + the new ones); bundles without this mark need masks over the capacity
        entry["slots"] = "used"
    return entry


def _share_target_weights(onnx_dir: Path, manifest: dict, dcfg, log) -> None:
    """A self-spec draft runs the target's first layers: their weights stay in the target's data file only."""
    from dream_export.export.shared_weights import share_initializers

    shared = share_initializers(onnx_dir / "target.onnx", onnx_dir / "draft.onnx")
    manifest["draft"].update(exit_layer=dcfg.exit_layer, imitation_blocks=dcfg.imitation_blocks,
                             shares_weights_with="target", shared_bytes=shared["shared_bytes"])
    log(f"self-spec draft: {shared['shared']} initializers ({shared['shared_bytes']} bytes) shared with the "
        "target graph")


def _export(module, args, path: Path, spec: GraphSpec, outputs: list[str] | None = None,
            axes: dict[str, dict[int, str]] | None = None) -> None:
    """Export `module` as graph `spec` (names and dynamic axes from the spec; `outputs` when optional ones vary,
    `axes` for dynamic axes a family adds, e.g. the views of an any-resolution image)."""
    import torch

    # the module's arguments are the spec's first inputs (a vision graph takes its grid inputs only for Qwen2.5-VL)
    input_names, output_names = spec.input_names()[:len(args)], outputs or spec.output_names(present=())
    dynamic_axes = {**spec.dynamic_axes(input_names + output_names), **(axes or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter gives plain standard-op graphs with named dynamic axes, which both
        # ONNX Runtime and TensorRT's parser take as they are.
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True)


def _processor_adds_special_tokens(proc) -> bool:
    """Whether the HF processor's tokenization adds the tokenizer's special tokens (llava-hf: a BOS the
    chat template leaves out), so the runtime encodes prompts the same way."""
    from dream_export.core.prompts import PromptEncoder, adds_special_tokens

    text = PromptEncoder(proc).prompt_text("?")
    plain = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    return adds_special_tokens(proc.tokenizer, text) and proc.tokenizer(text)["input_ids"] != plain


def export_bundle(target_dir: str | Path, draft_dir: str | Path, out: str | Path, opts: ExportOptions,
                  log=print) -> dict:
    """Export vision, target and draft graphs, embeddings, tokenizer and manifest into bundle `out`."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from dream_export.draft.data import target_identity
    from dream_export.draft.target import load_target
    from dream_export.draft.train import load_draft, load_draft_config
    from dream_export.export.graphs import DraftChainGraph, DraftGraph, TargetGraph, VisionGraph
    from dream_export.export.weights import prepare_decoder, release, to_fp32, unmap_freed_tensors
    from dream_export.families import params_from_hf, require_exportable
    from dream_export.runtime.preprocess import ImagePreprocessor

    t0 = time.time()
    unmap_freed_tensors()
    check_sources(target_dir, draft_dir)  # readable, supported, made for each other: refuse before work
    dcfg0 = load_draft_config(draft_dir)
    # A self-spec draft runs the target's first layers, so it loads beside the target; any other loads
    # first, since a supernet's taps decide what the target graph exposes.
    draft = None if dcfg0.arch == "self-spec" else load_draft(draft_dir)
    subnets = None if draft is None else SupernetExport.of(draft, draft_dir, opts.subnet)
    taps = tuple(opts.taps) or tuple(dcfg0.fuse_layers) or (subnets.taps if subnets else ())
    target = load_target(target_dir, taps=taps, dtype=opts.dtype)
    if subnets is None:
        subnets = SupernetExport.of(load_draft(draft_dir, target), draft_dir, opts.subnet)
    draft = subnets.draft
    model, proc = target.model, target.processor
    # refuse before tracing anything: what the graphs or the runtime would not reproduce
    require_exportable(target.vlm, proc.image_processor)
    dec = target.side.decoder
    # the graphs are traced in fp32 whatever the load dtype (fp16 variants are converted from them); the
    # decoder layers turn fp32 once the vision tower is written and freed (export.weights)
    to_fp32(model, skip=[dec.lm.layers])
    cfg = model.config
    text = cfg.get_text_config()
    hidden, n_layers, kvh, hd = text.hidden_size, dec.n_layers, dec.n_kv, dec.head_dim
    cap, tree = opts.kv_capacity, opts.max_tree
    dcfg = draft.config
    nb = len(draft.blocks)
    draft_cap = cap + tree  # committed draft rows + tree scratch
    cross_cap = cap + tree
    manifest: dict = {
        "format": "dream-export-bundle", "format_version": FORMAT_VERSION,
        "created_by": {"dream_export": __version__, "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__,
                       "onnx": __import__("onnx").__version__, "opset": OPSET},
        "source": {"target": {"path": relative_to_bundle(target_dir, out), "identity": target_identity(target_dir),
                              "model_type": cfg.model_type},
                   "draft": {"path": relative_to_bundle(draft_dir, out), "arch": dcfg.arch,
                             "identity": file_digest(Path(draft_dir) / "model.safetensors")}},
        "dims": {"hidden": hidden, "layers": n_layers, "heads": dec.n_heads, "kv_heads": kvh, "head_dim": hd,
                 "vocab": text.vocab_size, "draft_blocks": nb, "draft_kv_heads": dcfg.num_kv_heads,
                 "draft_head_dim": dcfg.head_dim},
        "kv_capacity": cap, "draft_capacity": draft_cap, "cross_capacity": cross_cap, "max_tree": tree,
        "topk": opts.topk, "taps": list(taps),
        "draft": {"arch": dcfg.arch, "uses_cross": draft.uses_cross, "eagle3_taps": dcfg.arch == "eagle3"},
        "tokens": {"image_token_id": int(getattr(cfg, "image_token_id", None) or cfg.image_token_index),
                   "bos_id": proc.tokenizer.bos_token_id, "eos_id": target.eos_ids[0], "eos_ids": target.eos_ids,
                   "pad_id": proc.tokenizer.pad_token_id,
                   "add_special_tokens": _processor_adds_special_tokens(proc)},
        # the table is stored as the checkpoint holds it; the runtime multiplies by the family's scale
        # (Gemma3: sqrt(hidden)), as the HF embedding module does — image features are not scaled
        "embeddings": {"file": "embeddings.safetensors", "tensor": "embed_tokens",
                       "scale": target.vlm.facts.embed_scale},
        # how the runtime lays out a prompt for this decoder (see runtime.masks.prefill_mask)
        "decoder": {"family": target.vlm.family, "image_blocks_bidirectional": target.vlm.spec.bidirectional_image_blocks,
                    "rope": target.vlm.facts.rope_kind, "sliding_window": target.vlm.facts.sliding_window,
                    "spatial_merge_size": getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", None)},
        "precision": {"vision": opts.precision, "target": opts.precision, "draft": opts.precision},
        "graphs": {},
    }
    with atomic_dir(out) as tmp:
        onnx_dir = tmp / "onnx"
        # vision: one call per image, over the image's views (one, or an anyres image's base view and tiles)
        vg = VisionGraph(target.vlm).eval()
        # a view's shape: what the runtime's preprocessing makes of a small blank image
        # (a non-square one, so that a traced image grid keeps its two sides apart)
        view = ImagePreprocessor(params_from_hf(proc.image_processor)).preprocess(np.zeros((48, 32, 3), np.uint8))
        kind = target.vlm.vision_layout()[0]["layout"]
        if kind == "grid":  # Qwen2.5-VL: the patches of one image and its grid's bookkeeping (runtime-computed)
            from dream_export.runtime.image_layout import ImageLayout

            feeds = ImageLayout.from_manifest({"vision": target.vlm.vision_layout()[0]}, {}).feeds(view, 0)
            v_args = tuple(torch.from_numpy(v) for v in feeds.values())
        else:
            v_args = (torch.zeros(1 if kind in ("single", "rows") else 2, *view["pixel_values"].shape[-3:]),)
        n_img = vg(*v_args).shape[1]
        layout, layout_tensors = target.vlm.vision_layout(int(n_img))
        # single-view layouts keep a static batch of 1 (the exported CLIP tower splits the CLS token with it);
        # tiled images vary in views, Pixtral's in size
        axes = {"single": None,
                "rows": {"pixel_values": {2: "height", 3: "width"}, "image_embeds": {1: "image_rows"}},
                "grid": {"pixel_values": {0: "patches"}, "image_embeds": {1: "units"}}}.get(
                    kind, {"pixel_values": {0: "views"}, "image_embeds": {0: "views"}})
        _export(vg, v_args, onnx_dir / "vision.onnx", SPECS["vision"], axes=axes)
        release([model], keep=[dec.lm, model.lm_head])  # the vision tower: written
        prepare_decoder(dec)
        manifest["tokens"]["image_tokens_per_image"] = int(n_img) if layout["layout"] == "single" else None
        manifest["vision"] = layout
        # target
        tg = TargetGraph(dec, model.lm_head, opts.topk, getattr(text, "final_logit_softcapping", None),
                         importance=opts.attn_scores, tap_norm=subnets.active).eval()
        t = 4
        # positions [1, T], or mRoPE's [3, T] (the runtime computes them: runtime.positions)
        pos = torch.arange(t)[None].expand(3 if target.vlm.facts.rope_kind == "mrope" else 1, t)
        t_args = (torch.zeros(1, t, hidden), pos, torch.ones(1, t, cap + t, dtype=torch.bool),
                  torch.zeros(n_layers, 1, kvh, cap, hd), torch.zeros(n_layers, 1, kvh, cap, hd), torch.tensor([t - 1]))
        scores = ["attn_importance", "attn_importance_max"] if opts.attn_scores else []
        t_out = SPECS["target"].output_names(present=scores + (["taps"] if taps else []))
        # a plain draft's weights are not held beside the target's while its graph is traced: loaded again after
        reload_draft = dcfg.arch != "self-spec" and not subnets.active
        if reload_draft:
            release([draft])
        _export(tg, t_args, onnx_dir / "target.onnx", SPECS["target"], t_out)
        if dcfg.arch != "self-spec":  # a self-spec draft runs the target's first layers
            release([dec.lm], keep=[target.side.embed_tokens, model.lm_head, dec.lm.norm])
        if reload_draft:
            draft = load_draft(draft_dir)
        # draft
        dkv, ddim = dcfg.num_kv_heads, dcfg.head_dim
        f = 2
        d_args = (torch.zeros(1, t, hidden), torch.arange(t)[None], torch.ones(1, t, draft_cap + t, dtype=torch.bool),
                  torch.zeros(nb, 1, dkv, draft_cap, ddim), torch.zeros(nb, 1, dkv, draft_cap, ddim),
                  torch.zeros(1, dkv, cross_cap, ddim), torch.zeros(1, dkv, cross_cap, ddim), torch.zeros(1, f, hidden),
                  torch.ones(1, t, cross_cap + f, dtype=torch.bool), torch.zeros(1, t, hidden),
                  # prev_taps: read by EAGLE-3 drafts only (their fuse width), pruned from the others' graphs
                  torch.zeros(1, t, hidden * (len(dcfg.fuse_layers) if dcfg.arch == "eagle3" else 1)))
        # the table the chain's steps look up carries the family's embedding scale, as the runtime's does
        embed_table = target.side.embed_tokens.weight.detach().float() * target.vlm.facts.embed_scale

        def export_draft(d, suffix: str = "") -> dict:
            """The draft graph (and the chain graph, for drafts with cross-attention, i.e. DREAM: the EAGLE
            baselines have none and read the predecessor's feature instead) of draft `d`: manifest entries."""
            dg = DraftGraph(d, model.lm_head, opts.topk, dcfg.final_logit_softcapping).eval()
            _export(dg, d_args, onnx_dir / f"draft{suffix}.onnx", SPECS["draft"])
            if d.config.arch == "self-spec":
                _share_target_weights(onnx_dir, manifest, d.config, log)
            names = ["draft"]
            if opts.chain_steps > 0 and d.uses_cross:
                cg = DraftChainGraph(d, model.lm_head, opts.chain_steps, dcfg.final_logit_softcapping).eval()
                _export(cg, (*d_args[:-2], embed_table), onnx_dir / f"draft_chain{suffix}.onnx", SPECS["draft_chain"])
                names.append("draft_chain")
            entries = {name: _graph_entry(onnx_dir, name, suffix) for name in names}
            if "draft_chain" in entries:
                # the chain graph repeats the draft's weights: it is valid only beside this very draft graph
                entries["draft_chain"].update(steps=opts.chain_steps, pairs_with=entries["draft"]["sha256"])
            return entries

        manifest["graphs"]["vision"] = _graph_entry(onnx_dir, "vision")
        drafts = export_draft(draft)  # a self-spec draft rewrites the target graph's weights as external data
        manifest["graphs"]["target"] = _graph_entry(onnx_dir, "target")
        manifest["graphs"].update(drafts)
        if subnets.active:
            manifest["taps_norm"] = True
            manifest["supernet"] = subnets.manifest_entry(lambda d, heads: export_draft(d, f".h{heads}"))
            subnets.save_draft(tmp)
        # runtime assets: embedding table, tokenizer, template, image preprocessing
        save_file({"embed_tokens": target.side.embed_tokens.weight.detach().float().contiguous(),
                   **{k: v.contiguous() for k, v in layout_tensors.items()}}, str(tmp / "embeddings.safetensors"))
        proc.save_pretrained(tmp / "processor")
        for fname in ("tokenizer.json", "chat_template.jinja", "chat_template.json"):
            src = tmp / "processor" / fname
            if src.exists():
                shutil.copy(src, tmp / fname)
        manifest["preprocess"] = params_from_hf(proc.image_processor)
        manifest["chat_template"] = proc.chat_template
        manifest["export_seconds"] = round(time.time() - t0, 1)
        manifest["files"] = record(tmp)  # size + sha256 of every file, verified on load and by `check`
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"exported bundle to {out} in {manifest['export_seconds']}s")
    return manifest
