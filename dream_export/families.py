"""The one place that knows how each Hugging Face VLM family is laid out.

Everything downstream (draft training, target export, calibration) talks to a `VLM`: text embeddings,
image features, the merged prompt embeddings, a decoder forward from embeddings with an explicit
mask, and the LM head — plus `TextFacts`, the decoder's dimensions and numerics as plain data. The
HF model's own sub-modules do the computing, so the adapter cannot drift from the checkpoint; what
this module adds is the per-family wiring (where the decoder stack lives, which processor outputs the
vision path needs, how positions and the prefill mask are built).

Supported: LLaVA, LLaVA-NeXT, Idefics3 (SmolVLM), Gemma3, Mistral3 (Pixtral), Qwen2.5-VL.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dream_export.errors import UsageError


@dataclass(frozen=True)
class FamilySpec:
    """How one HF model_type is wired: class, decoder location, and what its vision path consumes."""

    model_type: str
    model_class: str  # the transformers *ForConditionalGeneration class
    text_attr: str  # attribute of `model.model` holding the decoder stack
    vision_kwargs: tuple[str, ...]  # processor outputs the vision path takes besides pixel_values
    required_vision_kwargs: tuple[str, ...] = ()  # … and those it cannot do without
    # Gemma3 prefill: image tokens of one image attend to each other bidirectionally.
    bidirectional_image_blocks: bool = False
    # Qwen2.5-VL: 3D (temporal, height, width) positions for image tokens.
    mrope: bool = False


FAMILIES: dict[str, FamilySpec] = {
    "llava": FamilySpec("llava", "LlavaForConditionalGeneration", "language_model", ()),
    "llava_next": FamilySpec("llava_next", "LlavaNextForConditionalGeneration", "language_model",
                             ("image_sizes",), ("image_sizes",)),
    "idefics3": FamilySpec("idefics3", "Idefics3ForConditionalGeneration", "text_model",
                           ("pixel_attention_mask",)),
    "gemma3": FamilySpec("gemma3", "Gemma3ForConditionalGeneration", "language_model", (),
                         bidirectional_image_blocks=True),
    "mistral3": FamilySpec("mistral3", "Mistral3ForConditionalGeneration", "language_model", ("image_sizes",),
                           ("image_sizes",)),
    "qwen2_5_vl": FamilySpec("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "language_model",
                             ("image_grid_thw",), ("image_grid_thw",), mrope=True),
}


def supported_families() -> tuple[str, ...]:
    """The HF `model_type`s this project can load."""
    return tuple(FAMILIES)


# ------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class TextFacts:
    """The decoder's dimensions and numerics, read from the loaded model (JSON-able via `to_dict`).

    `head_dim` comes from the config when present: Gemma3 and Pixtral/Mistral3 use a head_dim that is
    not hidden_size/num_heads. `attention_scale` is the factor HF multiplies QK^T by (Gemma3:
    query_pre_attn_scalar**-0.5, others head_dim**-0.5). `embed_scale` multiplies the embedding lookup
    (Gemma: sqrt(hidden) rounded to the weight dtype). `norm` is "rms" (x̂·w) or "gemma_rms" (x̂·(1+w)).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    norm: str
    embed_scale: float
    final_logit_softcapping: float | None
    query_pre_attn_scalar: float | None
    attention_scale: float
    rope_kind: str  # "default" (1D positions [B,T]) or "mrope" (3D positions [3,B,T])
    rope_theta: float  # of full-attention layers
    rope_theta_local: float | None  # of sliding-window layers when it differs (Gemma3)
    rope_parameters: dict
    mrope_section: tuple[int, ...] | None
    tie_word_embeddings: bool
    hidden_act: str
    layer_types: tuple[str, ...]  # "full_attention" / "sliding_attention" per layer
    sliding_window: int | None
    qk_norm: bool  # per-head RMSNorm on q and k (Gemma3)
    sandwich_norm: bool  # extra post-attention / pre- and post-MLP norms (Gemma3)
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2.5-VL)

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _rope_thetas(tc) -> tuple[float, float | None, dict]:
    """(full-attention theta, sliding-layer theta or None, raw rope parameters) of a text config.

    transformers 5 keeps `rope_parameters` flat for most models and keyed by layer type for Gemma3.
    """
    params = dict(getattr(tc, "rope_parameters", None) or {})
    if "full_attention" in params:
        full = params["full_attention"]["rope_theta"]
        local = params.get("sliding_attention", {}).get("rope_theta")
        return float(full), (float(local) if local is not None and local != full else None), params
    theta = params.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
    return float(theta), None, params


def _layer_types(tc, n_layers: int) -> tuple[str, ...]:
    """Per-layer attention kind; Mistral without `layer_types` slides in every layer when it has a window."""
    types = getattr(tc, "layer_types", None)
    if types:
        return tuple(types[:n_layers])
    window = getattr(tc, "sliding_window", None)
    return ("sliding_attention" if window else "full_attention",) * n_layers


def _read_facts(family: str, tc, lm, lm_head) -> TextFacts:
    """TextFacts from the text config, cross-checked against the instantiated modules where they decide."""
    n_layers = tc.num_hidden_layers
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    attn = lm.layers[0].self_attn
    layer_types = _layer_types(tc, n_layers)
    theta, theta_local, rope_params = _rope_thetas(tc)
    embed = lm.embed_tokens
    embed_scale = float(embed.embed_scale.to(embed.weight.dtype)) if hasattr(embed, "embed_scale") else 1.0
    mrope = rope_params.get("mrope_section")
    return TextFacts(
        hidden_size=tc.hidden_size, num_layers=n_layers, num_heads=heads,
        num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=tc.intermediate_size, vocab_size=tc.vocab_size, rms_norm_eps=float(tc.rms_norm_eps),
        norm="gemma_rms" if family == "gemma3" else "rms", embed_scale=embed_scale,
        final_logit_softcapping=getattr(tc, "final_logit_softcapping", None),
        query_pre_attn_scalar=getattr(tc, "query_pre_attn_scalar", None),
        attention_scale=float(attn.scaling), rope_kind="mrope" if mrope else "default",
        rope_theta=theta, rope_theta_local=theta_local, rope_parameters=rope_params,
        mrope_section=tuple(mrope) if mrope else None,
        tie_word_embeddings=lm_head.weight.data_ptr() == embed.weight.data_ptr(),
        hidden_act=getattr(tc, "hidden_act", None) or getattr(tc, "hidden_activation", None),
        layer_types=layer_types,
        sliding_window=getattr(tc, "sliding_window", None) if "sliding_attention" in layer_types else None,
        qk_norm=hasattr(attn, "q_norm"), sandwich_norm=hasattr(lm.layers[0], "pre_feedforward_layernorm"),
        attention_bias=getattr(attn.q_proj, "bias", None) is not None,
    )


# --------------------------------------------------------------------------------------------- VLM


@dataclass
class DecoderOutput:
    """What `VLM.decoder_forward` returns.

    hidden:        [B,T,H] final-norm hidden states (the LM head's input, the draft's features).
    hidden_states: HF convention when requested: (embeddings, output of layer 1, …, output of layer L-1,
                   final-norm output) — L+1 tensors; the last equals `hidden`.
    attentions:    when requested, L tensors [B,heads,T,T] of attention probabilities.
    """

    hidden: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class VLM:
    """A loaded HF VLM seen through its family adapter."""

    family: str
    model: Any = field(repr=False)  # the HF *ForConditionalGeneration module
    path: Path | None = None
    spec: FamilySpec = field(init=False)
    facts: TextFacts = field(init=False)

    def __post_init__(self) -> None:
        self.spec = FAMILIES[self.family]
        self.facts = _read_facts(self.family, self.text_config, self.language_model, self.lm_head)

    # ----------------------------------------------------------------------- layout (module handles)

    @property
    def config(self):
        """The top-level HF config."""
        return self.model.config

    @property
    def text_config(self):
        """The decoder's config."""
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embed_tokens, layers, norm, rotary_emb)."""
        return getattr(self.model.model, self.spec.text_attr)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def embed_tokens(self) -> torch.nn.Module:
        """The input-embedding module (applies the family's embedding scale in forward)."""
        return self.language_model.embed_tokens

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.language_model.norm

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def rotary_emb(self) -> torch.nn.Module:
        return self.language_model.rotary_emb

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        tid = getattr(cfg, "image_token_id", None)
        return int(tid if tid is not None else cfg.image_token_index)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # ------------------------------------------------------------------------------ embeddings

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B,T,H] with the family's scaling; out-of-vocab ids (an image token id past
        the table, as Gemma3 allows) embed as id 0, as HF does — merge overwrites those slots."""
        ids = input_ids.to(self.device)
        ids = torch.where(ids >= self.embed_tokens.num_embeddings, torch.zeros_like(ids), ids)
        return self.embed_tokens(ids)

    def image_features(self, pixel_values: torch.Tensor, **processor_extras: Any) -> torch.Tensor:
        """Projected image features [n_image_tokens, H], in image-token order, via the family's own
        `get_image_features` (vision tower + projector; LLaVA-NeXT: tiling, unpadding, newline rows).

        `processor_extras` may hold the processor's whole output: only the family's vision inputs
        (image_sizes, pixel_attention_mask, image_grid_thw) are used.
        """
        kwargs = self._vision_kwargs(processor_extras)
        pixel_values = pixel_values.to(self.device, self.dtype)
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs)
        feats = out.pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], 0)
        return feats.reshape(-1, feats.shape[-1]).to(self.dtype)

    def view_features(self, pixel_values: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        """Projected features [views, rows, H] of preprocessed views [views, 3, h, w]: the computation the
        exported vision graph traces. The runtime lays the rows out in the prompt (`vision_layout`).
        Qwen2.5-VL: one image's flattened patches and its grid's bookkeeping (`grid`, the order of
        `runtime.vision_grid.vision_grid_inputs`) → [1, units, H]."""
        if self.family == "qwen2_5_vl":
            return self._qwen_view_features(pixel_values, *grid)
        if self.family == "llava_next":
            # LLaVA-NeXT's get_image_features also tiles and packs (data-dependent); the graph stops before that
            m, cfg = self.model.model, self.config
            hs = m.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
            layer = cfg.vision_feature_layer
            feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[k] for k in layer], -1)
            if cfg.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]  # the CLS token
            return m.multi_modal_projector(feats)
        if self.family == "idefics3":
            # Views are whole (no padded patches), so every view has the same patch positions: computed here
            # once, as HF's embeddings compute them for an all-ones patch mask (its data-dependent bucketing
            # does not export), and fed as a constant. Then the encoder, post-norm and pixel-shuffle connector.
            vm = self.model.model.vision_model
            emb = vm.embeddings
            x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
            x = x + emb.position_embedding(_idefics3_positions(emb.num_patches_per_side).to(x.device))
            hidden = vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)
            return self.model.model.connector(hidden)
        if self.family == "mistral3":
            return self._pixtral_view_features(pixel_values)
        feats = self.model.model.get_image_features(pixel_values=pixel_values)
        if not torch.is_tensor(feats):  # transformers 5 wraps it in a model output
            feats = getattr(feats, "pooler_output", None) if getattr(feats, "pooler_output", None) is not None \
                else feats[0]
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])

    def _pixtral_view_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Mistral3: one image [1, 3, H, W] of any size (whole merged patches) → [1, rows, H]: Pixtral's tower
        with 2-D RoPE over the image's own patch grid, then the projector's norm, the spatial patch merger
        and the MLP. HF's merger unfolds per image from python sizes; the same merge as reshapes keeps the
        grid's size symbolic in the exported graph."""
        m, cfg = self.model.model, self.config
        vt, proj = m.vision_tower, m.multi_modal_projector
        x = vt.patch_conv(pixel_values.to(vt.patch_conv.weight.dtype))[0]  # [C, h, w]
        h, w = x.shape[-2], x.shape[-1]
        x = vt.ln_pre(x.flatten(1).T.unsqueeze(0))
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = vt.patch_positional_embedding(x, torch.stack([hpos.flatten(), wpos.flatten()], -1))
        states = [x]
        for layer in vt.transformer.layers:
            out = layer(states[-1], None, position_embeddings=pos)
            states.append(out[0] if isinstance(out, tuple) else out)
        layer = cfg.vision_feature_layer
        feats = states[layer] if isinstance(layer, int) else torch.cat([states[k] for k in layer], -1)
        feats = proj.norm(feats[0])
        k, d = cfg.spatial_merge_size, feats.shape[-1]
        # unfold's order: merged patches row-major, each holding channel-major k×k neighbourhoods
        grid = feats.reshape(h // k, k, w // k, k, d).permute(0, 2, 4, 1, 3).reshape(-1, d * k * k)
        hidden = proj.linear_2(proj.act(proj.linear_1(proj.patch_merger.merging_layer(grid))))
        return hidden.unsqueeze(0)

    def _qwen_view_features(self, pixel_values: torch.Tensor, window_index: torch.Tensor,
                            reverse_index: torch.Tensor, patch_positions: torch.Tensor, full_mask: torch.Tensor,
                            window_mask: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's tower and merger as transformers computes them (`Qwen2_5_VisionTransformerPretrainedModel`),
        the window order, rotary positions and attention segments given as inputs: each block attends under
        a boolean mask (its frame in the full-attention blocks, its window in the others) where transformers
        attends segment by segment over `cu_seqlens`, so no shape depends on the grid's values."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        vt = self.model.model.visual
        x = vt.patch_embed(pixel_values)
        dim, unit = x.shape[-1], vt.spatial_merge_unit

        def windowed(t: torch.Tensor) -> torch.Tensor:  # units regrouped window by window
            return t.reshape(-1, unit, t.shape[-1])[window_index].reshape(-1, t.shape[-1])

        x = windowed(x)
        cos, sin = (windowed(t) for t in vt.rotary_pos_emb(x, patch_positions))
        for i, blk in enumerate(vt.blocks):
            mask = full_mask if i in vt.fullatt_block_indexes else window_mask
            attn = blk.attn
            h = blk.norm1(x)
            q, k, v = attn.qkv(h).reshape(-1, 3, attn.num_heads, attn.head_dim).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) * attn.scaling  # [heads, P, P]
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1).reshape(-1, dim)
            x = x + attn.proj(out)
            x = x + blk.mlp(blk.norm2(x))
        return vt.merger(x)[reverse_index].unsqueeze(0)

    def vision_layout(self, rows_per_view: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """The manifest's `vision` entry (see `runtime.image_layout`) and the tensors it names, given the rows
        the vision graph gives per view (None: only whether the family is laid out), or UsageError when the
        runtime does not reproduce how this family lays image features out."""
        if self.family == "llava":
            return {"layout": "single", "rows_per_view": rows_per_view}, {}
        if self.family == "gemma3":
            # Gemma3Processor's full_image_sequence: the template's <start_of_image> becomes blank lines around
            # <start_of_image>, the image tokens and <end_of_image>
            return ({"layout": "single", "rows_per_view": rows_per_view, "placeholder": "<start_of_image>",
                     "before": "\n\n<start_of_image>", "after": "<end_of_image>\n\n"}, {})
        if self.family == "llava_next":
            vc = self.config.vision_config
            grid = vc.image_size // vc.patch_size
            if rows_per_view not in (None, grid * grid):
                raise UsageError(f"llava_next views give {rows_per_view} rows, not the {grid}x{grid} grid its tiles "
                                 "are packed into (vision_feature_select_strategy 'full' is not supported)")
            return ({"layout": "anyres", "rows_per_view": rows_per_view, "grid": grid, "tile": vc.image_size,
                     "pinpoints": [[int(h), int(w)] for h, w in self.config.image_grid_pinpoints],
                     "newline": "image_newline"},
                    {"image_newline": self.model.model.image_newline.detach().float()})
        if self.family == "idefics3":
            # the marker tokens Idefics3Processor writes around each crop and the global view
            return ({"layout": "split", "rows_per_view": rows_per_view, "around": "<fake_token_around_image>",
                     "global": "<global-img>", "crop": "<row_{row}_col_{col}>"}, {})
        if self.family == "mistral3":
            # PixtralProcessor's rows: [IMG] per merged patch, [IMG_BREAK] after each row, [IMG_END] last
            step = self.config.vision_config.patch_size * self.config.spatial_merge_size
            return ({"layout": "rows", "step": step, "break": "[IMG_BREAK]", "end": "[IMG_END]"}, {})
        if self.family == "qwen2_5_vl":
            # one token per merged unit, the template's <|vision_start|><|image_pad|><|vision_end|> expanded;
            # window: merged units per attention-window side (transformers' vit_merger_window_size)
            vc = self.config.vision_config
            return ({"layout": "grid", "merge": vc.spatial_merge_size,
                     "window": vc.window_size // vc.spatial_merge_size // vc.patch_size}, {})
        raise UsageError(f"the runtime does not lay out {self.family} image features (vision inputs "
                         f"{', '.join(self.spec.required_vision_kwargs) or 'pixel_values'})")

    def _vision_kwargs(self, extras: dict) -> dict:
        missing = [k for k in self.spec.required_vision_kwargs if extras.get(k) is None]
        if missing:
            raise UsageError(f"{self.family} image features need the processor output(s) {', '.join(missing)}; "
                             "pass everything the processor returned")
        return {k: extras[k].to(self.device) for k in self.spec.vision_kwargs if extras.get(k) is not None}

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool [B,T]: the slots image features are spliced into."""
        return input_ids.to(self.device) == self.image_token_id

    def merge(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              **processor_extras: Any) -> torch.Tensor:
        """Prompt embeddings [B,T,H]: text embeddings with image features written into the image-token
        slots in order — the tensor HF's own forward feeds its decoder."""
        embeds = self.embed_text(input_ids)
        if pixel_values is None:
            return embeds
        feats = self.image_features(pixel_values, **processor_extras).to(embeds.dtype)
        mask = self.image_token_mask(input_ids)
        n_slots = int(mask.sum())
        if n_slots != feats.shape[0]:
            raise UsageError(f"the prompt has {n_slots} image tokens but the image gives {feats.shape[0]} "
                             "features: build input_ids with the model's own processor")
        merged = embeds.clone()
        merged[mask] = feats  # row-major order, as HF's masked_scatter
        return merged

    # ---------------------------------------------------------------------- positions and masks

    def position_ids(self, input_ids: torch.Tensor, **processor_extras: Any) -> torch.Tensor:
        """Prefill positions: [B,T] (0..T-1), or for mRoPE families [3,B,T] (t, h, w) laid out over
        each image grid as HF's get_rope_index does."""
        b, t = input_ids.shape
        if not self.spec.mrope:
            return torch.arange(t, device=self.device).expand(b, t).clone()
        grid = processor_extras.get("image_grid_thw")
        types = processor_extras.get("mm_token_type_ids")
        if types is None:
            # What the processor would return: 1 for image tokens (videos are not supported here).
            types = self.image_token_mask(input_ids).int()
        if grid is None:
            return torch.arange(t, device=self.device).expand(3, b, t).clone()
        pos, _ = self.model.model.get_rope_index(input_ids.to(self.device), mm_token_type_ids=types.to(self.device),
                                                 image_grid_thw=grid.to(self.device))
        return pos

    @staticmethod
    def next_position(position_ids: torch.Tensor) -> int:
        """The position of the first generated token: max prefill position + 1 (for mRoPE this is
        less than T, because an image grid advances positions by its side, not its area)."""
        return int(position_ids.max()) + 1

    def prefill_mask(self, input_ids: torch.Tensor, **processor_extras: Any) -> torch.Tensor:
        """Bool [B,T,T] "query may attend key" mask of the prompt as the HF model builds it: causal,
        and for Gemma3 also bidirectional within each image's block of image tokens (HF does that when
        the processor's token_type_ids are passed, which its processor always returns). The rule is
        `runtime.masks.prefill_mask`, the one the runtime applies."""
        from dream_export.runtime.masks import prefill_mask

        types = processor_extras.get("token_type_ids")
        is_img = (types == 1) if types is not None and self.spec.bidirectional_image_blocks \
            else self.image_token_mask(input_ids)
        rows = [prefill_mask(r.cpu().numpy(), self.spec.bidirectional_image_blocks) for r in is_img]
        return torch.from_numpy(np.stack(rows)).to(self.device)

    # ---------------------------------------------------------------------------------- decoder

    def decoder(self, taps: tuple[int, ...] = ()) -> torch.nn.Module:
        """The explicit-KV decoder the export traces and drafting reads features from
        (`modeling.decoder.TargetDecoder`), laid out as this family's blocks compute."""
        from dream_export.modeling.decoder import DecoderLayout, TargetDecoder

        f = self.facts
        layout = DecoderLayout(f.layer_types, f.sliding_window, f.attention_scale, f.qk_norm, f.sandwich_norm,
                               rope_by_layer_type=isinstance(f.rope_parameters.get("full_attention"), dict),
                               mrope=f.rope_kind == "mrope")
        return TargetDecoder(self.language_model, taps=taps, layout=layout)

    def decoder_forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
                        output_attentions: bool = False) -> DecoderOutput:
        """Run the decoder stack on embeddings (no cache).

        attention_mask: bool [B,T,T] (or [B,1,T,T]), True where query i may attend key j — causal
        prefill, a tree-ancestry mask, or `prefill_mask(...)`; None means causal. Sliding-window
        layers additionally restrict keys to those less than `window` positions back (by position, so a
        tree node sees the ancestors HF's token-by-token decoding of its path would; for a sequence
        with positions 0..T-1 this is HF's own i - j < window).
        position_ids: [B,T], or [3,B,T] for mRoPE families.
        """
        b, t, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(t, t, dtype=torch.bool, device=inputs_embeds.device).tril()
        allowed = attention_mask.to(inputs_embeds.device, torch.bool).reshape(-1, 1, t, t).expand(b, 1, t, t)
        out = self.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids.to(inputs_embeds.device),
                                  attention_mask=self._hf_masks(allowed, position_ids, inputs_embeds.dtype),
                                  use_cache=False,
                                  output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                  return_dict=True)
        return DecoderOutput(out.last_hidden_state, out.hidden_states if output_hidden_states else None,
                             out.attentions if output_attentions else None)

    def _hf_masks(self, allowed: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
        """Additive 4D masks in the form the HF decoder takes: one tensor when every layer is alike,
        else a {layer_type: mask} dict (Gemma3, Qwen2.5-VL with sliding layers accept it). Additive
        float rather than bool because HF's eager attention adds the mask to the scores."""
        t = allowed.shape[-1]
        masks = {}
        for kind in set(self.facts.layer_types):
            m = allowed
            if kind == "sliding_attention" and self.facts.sliding_window:
                pos = position_ids.to(allowed.device).reshape(-1, t)[:, None]  # [B,1,T] (1-D positions)
                m = m & ((pos[..., :, None] - pos[..., None, :]) < self.facts.sliding_window)
            masks[kind] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-norm hidden states, then tanh soft-capping when the config sets
        final_logit_softcapping (c·tanh(z/c), as Gemma's causal LM does; released Gemma3 checkpoints
        set none, and transformers' Gemma3ForConditionalGeneration does not apply it)."""
        z = self.lm_head(hidden)
        cap = self.facts.final_logit_softcapping
        return torch.tanh(z / cap) * cap if cap else z


def _idefics3_positions(side: int) -> torch.Tensor:
    """Patch position ids [side²] of a whole Idefics3 view, by HF's formula (bucketed fractional coordinates
    with the all-ones patch mask), as a constant (python ints: a trace records no op for it)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * (1.0 / torch.tensor([side]))[0], max=1.0 - 1e-6)
    bucket = torch.bucketize(coords, boundaries, right=True).tolist()
    return torch.tensor([h * side + w for h in bucket for w in bucket])


def _image_block_ids(is_img: torch.Tensor) -> torch.Tensor:
    """[B,T] index of the contiguous image-token run each token belongs to, -1 for text tokens."""
    prev = torch.nn.functional.pad(is_img, (1, 0), value=False)[:, :-1]
    starts = is_img & ~prev
    return torch.where(is_img, torch.cumsum(starts.int(), 1) - 1, torch.full_like(is_img, -1, dtype=torch.int))


# ------------------------------------------------------------------------------------------ loading


def family_of(config) -> str:
    """The family of an HF config, or UsageError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(f"model_type {model_type!r} is not a supported VLM family; supported: "
                         f"{', '.join(FAMILIES)}")
    return model_type


def load_vlm(path: str | Path, dtype: torch.dtype | str = torch.float32, attn_implementation: str = "eager",
             device: str | torch.device = "cpu") -> VLM:
    """Load a checkpoint directory through `from_pretrained` and wrap it in its family adapter.

    `dtype="auto"` keeps the checkpoint's own dtype (its config's `dtype`/`torch_dtype`).

    Eager attention by default: it is the implementation that returns attention probabilities (for
    DREAM's entropy targets and visual-token ranking) and the one that exports to plain ONNX ops.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory (no config.json); pass a saved HF checkpoint")
    config = AutoConfig.from_pretrained(str(path))
    family = family_of(config)
    model = _model_class(family).from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation)
    return VLM(family, model.to(device).eval(), path)


def wrap_vlm(model: Any, path: str | Path | None = None) -> VLM:
    """Adapter over an already instantiated HF VLM (e.g. one being trained)."""
    return VLM(family_of(model.config), model, Path(path) if path is not None else None)


def decoder_gaps(vlm: VLM) -> list[str]:
    """What the explicit-KV decoder the export traces (`VLM.decoder`) does not reproduce of this
    checkpoint's decoder. Empty when an export would compute what the HF model computes; otherwise
    export refuses rather than write a silently wrong graph."""
    f, gaps = vlm.facts, []
    if f.sliding_window and f.rope_kind != "default":
        gaps.append("sliding-window layers over 3-D positions")
    if getattr(vlm.text_config, "attn_logit_softcapping", None):
        gaps.append("attention logit soft-capping")
    return gaps


def export_gaps(vlm: VLM, image_processor: Any) -> list[str]:
    """Everything that keeps this checkpoint from exporting correctly: decoder features the traced decoder
    lacks, vision inputs beyond pixel_values the vision graph does not take, and image preprocessing the
    runtime does not reproduce."""
    gaps = decoder_gaps(vlm)
    try:
        vlm.vision_layout()
    except UsageError as e:
        gaps.append(str(e))
    try:
        params_from_hf(image_processor)
    except UsageError as e:
        gaps.append(str(e))
    return gaps


def require_exportable(vlm: VLM, image_processor: Any = None) -> None:
    """UsageError naming what this checkpoint needs that the export does not reproduce (`export_gaps`;
    without an image processor only `decoder_gaps`, what drafting needs)."""
    gaps = decoder_gaps(vlm) if image_processor is None else export_gaps(vlm, image_processor)
    if gaps:
        raise UsageError(f"{vlm.family} checkpoints are not supported yet: the traced decoder and graphs would "
                         f"not reproduce {'; '.join(gaps)}. Families that export: {', '.join(EXPORTABLE)}")


# Families whose checkpoints (as the Hub ships them) pass export, check and the runtime end to end.
EXPORTABLE = ("llava", "llava_next", "idefics3", "mistral3", "gemma3", "qwen2_5_vl")

# The README's support table, one row per family: (checkpoints, vision input handling, what works).
# tests/test_family_*.py back every claim: end to end for EXPORTABLE, the refusals for the others.
SUPPORT = {
    "llava": ("LLaVA-1.5 (llava-hf layout)", "CLIP shortest-edge resize + center crop, one image",
              "train-draft, export, check (HF forward), runtime: token-equal to HF generate"),
    "llava_next": ("LLaVA-1.6 / NeXT (llava-hf layout)", "anyres: a base view + the tiles of the best grid "
                   "pinpoint; unpadding and image-newline rows; image tokens per image from its size",
                   "train-draft, export, check (HF forward), runtime: token-equal to HF generate"),
    "idefics3": ("SmolVLM / Idefics3", "longest-edge resize, split into crops + a global view, pixel shuffle; "
                 "<row_r_col_c> / <global-img> markers in the prompt",
                 "train-draft, export, check (HF forward), runtime: token-equal to HF generate"),
    "gemma3": ("Gemma3", "SigLIP fixed-size resize (no pan-and-scan), <start_of_image> block",
               "train-draft, export, check (HF forward), runtime: token-equal to HF generate (sliding window, "
               "bidirectional image prefill, all EOS ids)"),
    "mistral3": ("Pixtral / Mistral3", "any image size (a dynamic patch grid with 2-D RoPE in the vision graph), "
                 "[IMG_BREAK] / [IMG_END] rows; processor built without torchvision",
                 "train-draft, export, check (HF forward), runtime: token-equal to HF generate; the test's tiny "
                 "draft reaches τ > 1.5 on at least 5 of 6 images"),
    "qwen2_5_vl": ("Qwen2.5-VL", "dynamic resolution: one image's patches per vision call, window attention "
                   "(window order, rotary positions and masks computed by the runtime); processor loads without "
                   "torchvision", "train-draft, export, check (HF forward), runtime: token-equal to HF generate "
                   "(3-D mRoPE positions from the runtime, for the prompt and every tree node)"),
}


def support_table() -> str:
    """The README's family support table (markdown), from `SUPPORT`."""
    rows = ["| family (model_type) | checkpoints | vision input handling | status (tested) |", "|---|---|---|---|"]
    rows += [f"| `{f}` | {c} | {v} | {s} |" for f, (c, v, s) in SUPPORT.items()]
    return "\n".join(rows)


def load_processor(path: str | Path) -> Any:
    """The checkpoint's `AutoProcessor`. Transformers 5 builds some processors on torchvision: for a Pixtral
    processor the same processing is assembled from the tokenizer and PIL image processor
    (`processors.PixtralPromptProcessor`); Qwen2.5-VL's needs torchvision only for its video processor, so the
    same processor class is built from the saved tokenizer and image processor, images only
    (`_qwen_image_processor`). Any other ImportError becomes a UsageError carrying the whole message, not
    just its last line."""
    from transformers import AutoConfig, AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path))
    except ImportError as e:
        cfg = Path(path) / "processor_config.json"
        if "torchvision" in str(e).lower() and cfg.is_file() and \
                json.loads(cfg.read_text()).get("processor_class") == "PixtralProcessor":
            # Mistral3 / Pixtral: the same processing from its tokenizer and PIL image processor
            from dream_export.processors import PixtralPromptProcessor

            return PixtralPromptProcessor.from_pretrained(path)
        if getattr(AutoConfig.from_pretrained(str(path)), "model_type", None) == "qwen2_5_vl":
            return _qwen_image_processor(path)
        raise UsageError(f"loading the processor of {path} failed: {' '.join(str(e).split())}") from e


def _qwen_image_processor(path: str | Path) -> Any:
    """transformers' own `Qwen2_5_VLProcessor` (its image-token expansion, mm_token_type_ids and chat
    template) over the checkpoint's tokenizer and image processor, without the video processor whose
    import needs torchvision (its wheels are CUDA builds that do not sit beside a CPU torch)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # what Qwen2_5_VLProcessor.__init__ sets, minus the video processor it passes on
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    return Qwen2_5_VLImageProcessor(AutoImageProcessor.from_pretrained(str(path)), tokenizer,
                                    chat_template=template or getattr(tokenizer, "chat_template", None))


def eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """Every token id that ends an answer, as HF `generate` decides: the generation config's (a list for
    Gemma3: <eos> and <end_of_turn>), else the model config's, else the tokenizer's."""
    for src in (getattr(model, "generation_config", None), model.config, model.config.get_text_config(),
                tokenizer):
        val = getattr(src, "eos_token_id", None) if src is not None else None
        ids = [int(i) for i in (val if isinstance(val, (list, tuple)) else [val]) if i is not None]
        if ids:
            return list(dict.fromkeys(ids))
    return []


def _model_class(family: str):
    import transformers

    name = FAMILIES[family].model_class
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UsageError(f"this transformers ({transformers.__version__}) has no {name}; upgrade transformers")
    return cls


# ------------------------------------------------------------------------------ image preprocessing


def params_from_hf(image_processor: Any) -> dict:
    """The HF image processor's parameters as a JSON-able dict for `runtime.preprocess.ImagePreprocessor`.

    Kinds: "clip" (resize shortest edge, center crop: CLIP / LLaVA), "llava_next" (any-resolution tiles),
    "idefics3" (crops + global view),
    "siglip" (resize to a fixed size:
    SigLIP / Gemma3), "pixtral" (Mistral3) and "qwen2_vl" (Qwen2-VL / Qwen2.5-VL). Raises UsageError for
    processors whose extra steps are not reproduced (LLaVA's pad-to-square, Gemma3 pan-and-scan).
    """
    name = type(image_processor).__name__.removesuffix("Pil").removesuffix("Fast")
    ip = image_processor
    common = {
        "source": type(image_processor).__name__,
        "do_resize": bool(ip.do_resize), "resample": int(ip.resample if ip.resample is not None else 2),
        "do_rescale": bool(ip.do_rescale), "rescale_factor": float(ip.rescale_factor),
        "do_normalize": bool(ip.do_normalize), "image_mean": [float(x) for x in ip.image_mean],
        "image_std": [float(x) for x in ip.image_std],
    }
    size = _size_dict(ip.size)
    if name in ("CLIPImageProcessor", "LlavaImageProcessor"):
        if getattr(ip, "do_pad", False):
            raise UsageError(f"{name} with do_pad=True (pad to square) is not reproduced by the runtime")
        return {"kind": "clip", **common, "size": size, "do_center_crop": bool(ip.do_center_crop),
                "crop_size": _size_dict(ip.crop_size)}
    if name == "LlavaNextImageProcessor":
        return {"kind": "llava_next", **common, "size": size, "do_center_crop": bool(ip.do_center_crop),
                "crop_size": _size_dict(ip.crop_size),
                "image_grid_pinpoints": [[int(h), int(w)] for h, w in ip.image_grid_pinpoints]}
    if name == "Idefics3ImageProcessor":
        return {"kind": "idefics3", **common, "size": size, "max_image_size": _size_dict(ip.max_image_size),
                "do_image_splitting": bool(ip.do_image_splitting)}
    if name in ("SiglipImageProcessor", "Gemma3ImageProcessor"):
        if getattr(ip, "do_pan_and_scan", False):
            raise UsageError("Gemma3 pan-and-scan is not reproduced by the runtime; disable do_pan_and_scan")
        if "height" not in size:
            raise UsageError(f"{name} with size {size} is not a fixed-size resize")
        return {"kind": "siglip", **common, "size": size}
    if name == "PixtralImageProcessor":
        if getattr(ip, "do_center_crop", False):
            raise UsageError("Pixtral with do_center_crop=True is not reproduced by the runtime")
        return {"kind": "pixtral", **common, "size": size, "patch_size": _size_dict(ip.patch_size)}
    if name == "Qwen2VLImageProcessor":
        return {"kind": "qwen2_vl", **common, "size": size, "patch_size": int(ip.patch_size),
                "merge_size": int(ip.merge_size), "temporal_patch_size": int(ip.temporal_patch_size)}
    raise UsageError(f"image processor {type(image_processor).__name__} is not reproduced by the runtime "
                     "(supported: CLIP/LLaVA, SigLIP/Gemma3, Pixtral and Qwen2-VL image processors)")


def _size_dict(size: Any) -> dict:
    """HF size (dict or SizeDict) → plain dict of the keys that are set."""
    items = size.items() if hasattr(size, "items") else dict(size).items()
    return {k: int(v) for k, v in items if v is not None}
