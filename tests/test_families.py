"""The family adapter against the real HF architectures: every family's merged embeddings and decoder
forward reproduce the HF model's own forward, and the facts carry each family's peculiarities."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dream_export.errors import UsageError
from dream_export.families import load_vlm, params_from_hf, supported_families, wrap_vlm

try:
    from tests.tiny_vlms import FAMILIES, cached_tiny_vlm, processor_inputs, tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from tiny_vlms import FAMILIES, cached_tiny_vlm, processor_inputs, tiny_image

VISION_INPUTS = ("input_ids", "pixel_values")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """Factory: `tiny_vlm(family)` → path of a saved tiny checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("tiny_vlms")
    return lambda family: cached_tiny_vlm(family, root)


def _inputs(family: str, path, size=(50, 38)) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    enc = processor_inputs(family, path, tiny_image(*size))
    extras = {k: v for k, v in enc.items() if k not in VISION_INPUTS}
    return enc["input_ids"], enc["pixel_values"], extras, enc


def _adapter_logits(vlm, ids, pixels, extras) -> tuple[torch.Tensor, torch.Tensor]:
    merged = vlm.merge(ids, pixels, **extras)
    out = vlm.decoder_forward(merged, vlm.position_ids(ids, **extras), vlm.prefill_mask(ids, **extras))
    return merged, vlm.logits(out.hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_decoder_reproduce_hf_forward(tiny_vlm, family):
    from transformers import AutoModelForImageTextToText

    path = tiny_vlm(family)
    vlm = load_vlm(path)
    assert vlm.family == family
    # The reference is loaded independently, with transformers' default attention implementation.
    ref_model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    ids, pixels, extras, enc = _inputs(family, path)
    assert int(vlm.image_token_mask(ids).sum()) > 0
    with torch.no_grad():
        ref = ref_model(**enc, output_hidden_states=True)
        merged, logits = _adapter_logits(vlm, ids, pixels, extras)
    assert (merged - ref.hidden_states[0]).abs().max().item() < 1e-5
    assert (logits - ref.logits).abs().max().item() < 1e-4


def test_head_dim_comes_from_config_not_hidden_over_heads(tiny_vlm):
    gemma, mistral, llava = (load_vlm(tiny_vlm(f)).facts for f in ("gemma3", "mistral3", "llava"))
    for facts in (gemma, mistral):
        assert facts.head_dim == 32 != facts.hidden_size // facts.num_heads
    assert llava.head_dim == llava.hidden_size // llava.num_heads == 16
    assert all(f.num_kv_heads < f.num_heads for f in (gemma, mistral, llava))  # GQA


def test_gemma3_facts(tiny_vlm):
    vlm = load_vlm(tiny_vlm("gemma3"))
    f = vlm.facts
    assert f.norm == "gemma_rms" and f.qk_norm and f.sandwich_norm
    assert f.embed_scale == pytest.approx(f.hidden_size**0.5)
    assert f.query_pre_attn_scalar == 24 and f.attention_scale == pytest.approx(24**-0.5)
    assert f.layer_types == ("sliding_attention", "full_attention") and f.sliding_window == 6
    assert f.rope_theta == 1e6 and f.rope_theta_local == 1e4
    assert f.tie_word_embeddings and f.hidden_act == "gelu_pytorch_tanh"
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(vlm.embed_text(ids), vlm.embed_tokens.weight[ids] * f.embed_scale)
    json.dumps(f.to_dict())


def test_other_facts(tiny_vlm):
    qwen = load_vlm(tiny_vlm("qwen2_5_vl")).facts
    assert qwen.rope_kind == "mrope" and qwen.mrope_section == (2, 3, 3) and qwen.attention_bias
    llava = load_vlm(tiny_vlm("llava")).facts
    assert (llava.norm, llava.rope_kind, llava.embed_scale, llava.sliding_window) == ("rms", "default", 1.0, None)
    assert not llava.tie_word_embeddings and llava.final_logit_softcapping is None


def test_gemma3_prefill_mask_is_bidirectional_within_the_image(tiny_vlm):
    path = tiny_vlm("gemma3")
    vlm = load_vlm(path)
    ids, pixels, extras, _ = _inputs("gemma3", path)
    mask = vlm.prefill_mask(ids, **extras)[0]
    img = vlm.image_token_mask(ids)[0].nonzero().flatten()
    first, last = int(img[0]), int(img[-1])
    assert mask[first, last] and not mask[first - 1, first]  # image sees its future image tokens only
    future = (mask & ~torch.ones_like(mask).tril()).nonzero()
    assert future.numel() and ((future >= first) & (future <= last)).all()  # only image→image look ahead
    with torch.no_grad():
        merged = vlm.merge(ids, pixels, **extras)
        pos = vlm.position_ids(ids)
        causal = vlm.logits(vlm.decoder_forward(merged, pos).hidden)
        prefill = vlm.logits(vlm.decoder_forward(merged, pos, mask[None]).hidden)
    assert (causal - prefill).abs().max() > 1e-3  # the HF forward would be missed with a causal mask


def test_qwen_positions_are_3d(tiny_vlm):
    path = tiny_vlm("qwen2_5_vl")
    vlm = load_vlm(path)
    ids, _, extras, _ = _inputs("qwen2_5_vl", path)
    pos = vlm.position_ids(ids, **extras)
    t = ids.shape[1]
    assert pos.shape == (3, 1, t)
    img = vlm.image_token_mask(ids)[0]
    assert not torch.equal(pos[1, 0, img], pos[2, 0, img])  # height and width axes differ on the grid
    assert vlm.next_position(pos) < t  # a grid advances positions by its side, not its area
    assert vlm.position_ids(ids).shape == (3, 1, t)  # without the grid: text-only 3D positions


def test_hidden_states_and_attentions(tiny_vlm):
    path = tiny_vlm("llava")
    vlm = load_vlm(path)
    ids, pixels, extras, _ = _inputs("llava", path)
    with torch.no_grad():
        merged = vlm.merge(ids, pixels, **extras)
        out = vlm.decoder_forward(merged, vlm.position_ids(ids), output_hidden_states=True,
                                  output_attentions=True)
    n = vlm.facts.num_layers
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    assert torch.equal(out.hidden_states[0], merged) and torch.equal(out.hidden_states[-1], out.hidden)
    att = out.attentions[-1]
    assert att.shape == (1, vlm.facts.num_heads, ids.shape[1], ids.shape[1])
    assert torch.allclose(att.sum(-1), torch.ones(()), atol=1e-5)
    assert att[..., ~torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()].abs().max() == 0


def test_tree_mask_is_honoured(tiny_vlm):
    """Two siblings at the same position see the prefix but not each other: each matches a plain
    causal run of prefix + itself."""
    vlm = load_vlm(tiny_vlm("mistral3"))
    emb = vlm.embed_text(torch.tensor([[1, 10, 11, 12, 20, 21]]))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    mask[5, 4] = False
    pos = torch.tensor([[0, 1, 2, 3, 4, 4]])
    with torch.no_grad():
        tree = vlm.decoder_forward(emb, pos, mask[None]).hidden
        alone = vlm.decoder_forward(emb[:, [0, 1, 2, 3, 5]], pos[:, :5]).hidden
    assert (tree[0, 5] - alone[0, 4]).abs().max() < 1e-5


def test_logit_softcapping(tiny_vlm):
    vlm = load_vlm(tiny_vlm("gemma3"))
    hidden = torch.randn(1, 3, vlm.facts.hidden_size) * 10
    raw = vlm.lm_head(hidden)
    vlm.facts = dataclasses.replace(vlm.facts, final_logit_softcapping=5.0)
    capped = vlm.logits(hidden)
    assert torch.allclose(capped, 5.0 * torch.tanh(raw / 5.0)) and capped.abs().max() < 5.0


def test_merge_rejects_a_token_count_mismatch(tiny_vlm):
    path = tiny_vlm("llava")
    vlm = load_vlm(path)
    ids, pixels, extras, _ = _inputs("llava", path)
    first = int(vlm.image_token_mask(ids)[0].nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 1:]], 1)
    with pytest.raises(UsageError, match="image tokens"):
        vlm.merge(short, pixels, **extras)


def test_missing_vision_inputs_are_named(tiny_vlm):
    path = tiny_vlm("llava_next")
    vlm = load_vlm(path)
    _, pixels, _, _ = _inputs("llava_next", path)
    with pytest.raises(UsageError, match="image_sizes"):
        vlm.image_features(pixels)


def test_unsupported_model_type_is_a_usage_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path)
    with pytest.raises(UsageError) as err:
        load_vlm(tmp_path)
    assert "'bert'" in str(err.value)
    assert all(f in str(err.value) for f in supported_families())
    with pytest.raises(UsageError, match="config.json"):
        load_vlm(tmp_path / "missing")


def test_wrap_vlm_and_params_from_hf(tiny_vlm):
    from transformers import AutoImageProcessor

    path = tiny_vlm("llava")
    vlm = wrap_vlm(load_vlm(path).model)
    assert vlm.family == "llava" and vlm.path is None
    params = params_from_hf(AutoImageProcessor.from_pretrained(str(path)))
    assert params["kind"] == "clip" and params["size"] == {"shortest_edge": 32}
    json.dumps(params)
    anyres = params_from_hf(AutoImageProcessor.from_pretrained(str(tiny_vlm("llava_next"))))
    assert anyres["kind"] == "llava_next" and anyres["image_grid_pinpoints"] == [[32, 64], [64, 32], [64, 64]]
    qwen = params_from_hf(AutoImageProcessor.from_pretrained(str(tiny_vlm("qwen2_5_vl"))))
    assert (qwen["kind"], qwen["patch_size"], qwen["merge_size"]) == ("qwen2_vl", 8, 2)
