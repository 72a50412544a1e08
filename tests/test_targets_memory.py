"""Memory planning: byte counts from real 7B-class configs, the fit decision, and refusals with numbers."""

from __future__ import annotations

import dataclasses
import re

import pytest

from dream_export.errors import UsageError
from dream_export.targets import DraftDesc, describe_model, estimate, get_target, plan_memory
from dream_export.targets.memory import ENGINE_CONTEXTS, GiB, _activation_bytes

# LLaVA-1.5-7B: Vicuna-7B decoder + CLIP ViT-L/14 at 336 px, written out in full.
LLAVA_15_7B = {
    "model_type": "llava",
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "text_config": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32064, "rms_norm_eps": 1e-5,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
        "num_attention_heads": 16, "intermediate_size": 4096, "patch_size": 14, "image_size": 336,
    },
}

# LLaVA-1.6 (llava-hf/llava-v1.6-vicuna-7b-hf style): the hub file leaves Llama defaults out of
# text_config (no hidden_size, no layer count) and adds anyres grid pinpoints.
LLAVA_16_7B_AS_ON_HUB = {
    "model_type": "llava_next",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "model_type": "llama", "max_position_embeddings": 4096, "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768},
}


@pytest.fixture(scope="module")
def llava7b():
    return describe_model(LLAVA_15_7B, name="llava-1.5-7b")


def test_7b_language_model_is_about_13_5_gb_in_fp16(llava7b):
    assert llava7b.lm_params() == pytest.approx(6.74e9, rel=0.005)  # the "7B" of Vicuna-7B
    plan = estimate(llava7b, "jetson-agx-orin-64gb", "fp16", kv_capacity=4096, tree_size=32)
    b = plan.breakdown()
    # decoder + LM head (the graph) + the embedding table = the LM's fp16 weights; the runtime keeps
    # its embedding table in fp32 (twice the fp16 table)
    assert b["target_weights"] + b["embedding_table"] // 2 == pytest.approx(13.5e9, rel=0.01)
    assert b["embedding_table"] == 32064 * 4096 * 4
    # CLIP ViT-L/14-336 is ~0.30B parameters; with the 2-layer projector ~0.65 GB in fp16
    assert b["vision_weights"] == pytest.approx(0.65e9, rel=0.05)


def test_kv_cache_and_draft_sizes_follow_the_formulas(llava7b):
    plan = estimate(llava7b, "jetson-agx-orin-64gb", "fp16", kv_capacity=2048, tree_size=32)
    b = plan.breakdown()
    # 2 x layers x kv_heads x head_dim x capacity x 4: the runtime's caches are fp32 numpy buffers
    assert b["kv_cache"] == 2 * 32 * 32 * 128 * 2048 * 4
    # DREAM's 3 blocks' K/V (two self-attention, one cross-attention) + per-position target features
    assert b["draft_cache"] == (2 * 3 * 32 * 128 + 4096) * (2048 + 32) * 4
    # three decoder blocks at width 4096 + its own copy of the 32064 x 4096 LM head, in fp16
    assert b["draft_weights"] == pytest.approx((3 * 202.4e6 + 32064 * 4096) * 2, rel=0.01)
    # int8 keeps the same fp32 runtime caches and roughly halves the decoder weights (LM head stays fp16)
    q = estimate(llava7b, "jetson-agx-orin-64gb", "int8", kv_capacity=2048, tree_size=32).breakdown()
    assert q["kv_cache"] == b["kv_cache"]
    assert q["target_weights"] == pytest.approx(32 * 202.4e6 + 32064 * 4096 * 2, rel=0.01)


def test_fits_agx_orin_64gb_in_fp16_with_the_largest_capacity_and_tree(llava7b):
    plan = plan_memory(llava7b, "jetson-orin", "fp16")
    assert plan.fits and (plan.kv_capacity, plan.tree_size) == (4096, 64)
    assert plan.target == "jetson-agx-orin-64gb"
    assert plan.usable_bytes == int(60 * GiB)  # 64 GiB minus the OS reserve
    assert 15 * GiB < plan.device_bytes < 40 * GiB
    assert "kv_cache" in plan.format() and plan.to_dict()["device_bytes"] == plan.device_bytes


def test_refused_on_orin_nano_4gb_with_the_numbers(llava7b):
    with pytest.raises(UsageError) as err:
        plan_memory(llava7b, "jetson-orin-nano-4gb", "fp16")
    msg = str(err.value)
    needed, usable = (float(x) for x in re.search(r"needs ([\d.]+) GiB.*has ([\d.]+) GiB usable", msg).groups())
    assert needed > 13 and usable == pytest.approx(3.1, abs=0.05)
    assert "jetson-orin-nano-4gb" in msg and "target_weights" in msg and "int8" in msg
    # int8 is also refused there (6+ GiB of weights), and the hint no longer suggests int8
    with pytest.raises(UsageError) as err8:
        plan_memory(llava7b, "jetson-orin-nano-4gb", "int8")
    assert "Try an int8" not in str(err8.value)


def test_ladder_picks_the_largest_capacity_that_fits(llava7b):
    base = get_target("jetson-agx-orin-64gb")
    need_1024 = estimate(llava7b, base, "fp16", 1024, 64).device_bytes
    need_2048 = estimate(llava7b, base, "fp16", 2048, 16).device_bytes
    assert need_1024 < need_2048
    # a device with room for capacity 1024 (tree 64) but not for 2048 at any tree size
    squeezed = dataclasses.replace(base, memory_gb=(need_1024 + need_2048) / 2 / GiB + base.os_reserve_gb)
    plan = plan_memory(llava7b, squeezed, "fp16")
    assert (plan.kv_capacity, plan.tree_size) == (1024, 64)
    # a fixed capacity is honoured, and refused with numbers when it does not fit
    with pytest.raises(UsageError, match="KV capacity 4096"):
        plan_memory(llava7b, squeezed, "fp16", kv_capacity=4096)


def test_discrete_gpus_keep_the_embedding_table_in_host_ram(llava7b):
    plan = plan_memory(llava7b, "l4", "fp16")
    emb = next(i for i in plan.items if i.name == "embedding_table")
    # so are the runtime's caches: the TensorRT backend maps host buffers, it does not copy them
    caches = {i.name: i for i in plan.items if i.name in ("kv_cache", "draft_cache")}
    assert not emb.on_device and not any(i.on_device for i in caches.values())
    assert plan.host_bytes == emb.bytes + sum(i.bytes for i in caches.values())
    jetson = plan_memory(llava7b, "jetson-agx-orin-64gb", "fp16", kv_capacity=plan.kv_capacity)
    assert next(i for i in jetson.items if i.name == "embedding_table").on_device


def test_activations_count_every_execution_context_of_every_engine(llava7b):
    # the backend makes one context per optimization profile and TensorRT sizes each for the engine's
    # largest profile: the target's and the draft's activations are reserved twice
    assert ENGINE_CONTEXTS == {"vision": 1, "target": 2, "draft": 2}
    plan = estimate(llava7b, "jetson-orin-nano-8gb", "fp16", kv_capacity=2048, tree_size=32)
    item = next(i for i in plan.items if i.name == "activations")
    per_engine = _activation_bytes(llava7b, DraftDesc.from_model(llava7b), "fp16", 2048, 32)
    assert item.bytes == per_engine["vision"] + 2 * per_engine["target"] + 2 * per_engine["draft"]
    assert "2x target" in item.note and "2x draft" in item.note
    # the draft's context pass runs over a whole prompt, so its largest profile holds capacity-many
    # positions' logits (fp32 over the 32064-token vocabulary)
    assert per_engine["draft"] > 2048 * 32064 * 4


def test_fp8_is_refused_before_sizing_on_targets_without_fp8(llava7b):
    with pytest.raises(UsageError, match="does not support fp8"):
        plan_memory(llava7b, "jetson-agx-orin-64gb", "fp8")
    assert plan_memory(llava7b, "h100", "fp8").fits


def test_partial_hub_config_is_completed_with_transformers_defaults():
    m = describe_model(LLAVA_16_7B_AS_ON_HUB)
    t = m.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, t.vocab_size) == (4096, 32, 32, 11008, 32064)
    assert m.lm_params() == pytest.approx(describe_model(LLAVA_15_7B).lm_params())
    assert m.vision.images_per_prompt == 5  # base image + up to 4 tiles of 336 in a 672x672 grid
    assert m.vision.lm_tokens == 5 * 576
    assert m.name == "llava_next"


def test_explicit_head_dim_and_gqa_are_honoured():
    gemma3 = {"model_type": "gemma3",
              "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34,
                              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                              "intermediate_size": 10240, "vocab_size": 262208},
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                                "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                                "patch_size": 14}}
    m = describe_model(gemma3)
    assert m.vision.lm_tokens == 256  # 64x64 patches pooled to mm_tokens_per_image
    assert m.text.head_dim == 256 != 2560 // 8
    assert m.text.tie_word_embeddings
    kv = estimate(m, "jetson-thor", "fp16", 1024, 32).breakdown()["kv_cache"]
    assert kv == 2 * 34 * 4 * 256 * 1024 * 4


def test_draft_from_draft_config_json():
    cfg = {"hidden_size": 4096, "num_heads": 32, "num_kv_heads": 32, "head_dim": 128,
           "intermediate_size": 11008, "vocab_size": 32064, "arch": "dream", "cross_attention": False}
    no_cross = DraftDesc.from_config(cfg)
    full = DraftDesc.from_config({**cfg, "cross_attention": True})
    assert (no_cross.num_blocks, full.num_blocks) == (2, 3)
    assert full.block_params()[0] > no_cross.block_params()[0]
    assert full.block_params()[1] == 32064 * 4096  # the LM head copy


def test_config_without_sizes_is_a_clear_error():
    with pytest.raises(UsageError, match="hidden_size"):
        describe_model({"model_type": "mystery", "text_config": {"model_type": "mystery"}})


def test_flat_qwen25_vl_config_reads_text_keys_from_the_top_level():
    qwen = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
            "tie_word_embeddings": False,
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "patch_size": 14, "spatial_merge_size": 2, "out_hidden_size": 3584}}
    m = describe_model(qwen)
    assert (m.text.num_kv_heads, m.text.head_dim) == (4, 128)
    assert m.lm_params() == pytest.approx(7.6e9, rel=0.03)  # Qwen2.5-7B class (q/k/v biases not counted)
    assert m.vision.num_layers == 32 and m.vision.gated_mlp
    assert m.vision.params() == pytest.approx(0.67e9, rel=0.1)  # the ~670M Qwen2.5-VL ViT + merger
    assert m.vision.lm_tokens == 256  # a 448x448 image: 32x32 patches, merged 2x2 into decoder tokens
    assert describe_model(LLAVA_15_7B).vision.lm_tokens == 576  # no merge; the class token is dropped


def test_idefics3_pixel_shuffle_merges_scale_squared_patches():
    smolvlm = {"model_type": "idefics3", "scale_factor": 3,
               "text_config": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 24,
                               "num_attention_heads": 32, "intermediate_size": 8192, "vocab_size": 49155},
               "vision_config": {"model_type": "idefics3_vision", "hidden_size": 1152, "image_size": 384,
                                 "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                                 "patch_size": 14}}
    assert describe_model(smolvlm).vision.lm_tokens == 81  # 27x27 patches, 3x3 into one token
