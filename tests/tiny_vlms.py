"""Tiny random models of the real Hugging Face VLM architectures, saved like a user's checkpoint.

Every builder instantiates the genuine `*ForConditionalGeneration` class from a config (hidden 32–64,
2 layers, images of 32–64 px), saves it with `save_pretrained` together with a tiny tokenizer and the
family's own processor, and returns the directory. Tests then load it back through `from_pretrained`,
the same code path a downloaded checkpoint takes.

The shapes deliberately exercise what differs between families: grouped-query attention everywhere,
head_dim != hidden/heads (Gemma3, Mistral3), Gemma3's query_pre_attn_scalar, sliding window and
embedding scaling, Qwen2.5-VL's mRoPE sections, LLaVA's penultimate-layer features, LLaVA-NeXT's
anyres tiling, Idefics3's pixel shuffle and Pixtral's variable image size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

FAMILIES = ("llava", "llava_next", "idefics3", "gemma3", "mistral3", "qwen2_5_vl")

# A shared tiny decoder: GQA (4 query heads over 2 KV heads), 2 layers.
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
MEAN_STD = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.3, 0.35]}

BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

# Per family: the special tokens its processor looks up, and the named ones it reads as tokenizer attributes.
FAMILY_SPECIALS: dict[str, tuple[list[str], dict[str, str]]] = {
    "llava": (["<image>"], {"image_token": "<image>"}),
    "llava_next": (["<image>"], {"image_token": "<image>"}),
    "idefics3": (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                 + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)], {}),
    "gemma3": (["<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>"],
               {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                "eoi_token": "<end_of_image>"}),
    "mistral3": (["[IMG]", "[IMG_BREAK]", "[IMG_END]"], {}),
    "qwen2_5_vl": (["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>",
                    "<|im_end|>", "<|endoftext|>"],
                   {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
}

# The text a user would pass to the processor: the family's image placeholder, then a question.
PROMPTS = {
    "llava": "USER: <image>\nWhat is shown? ASSISTANT:",
    "llava_next": "USER: <image>\nWhat is shown? ASSISTANT:",
    "idefics3": "User:<image>What is shown?<end_of_utterance>\nAssistant:",
    "gemma3": "<start_of_turn>user\n<start_of_image>What is shown?<end_of_turn>\n<start_of_turn>model\n",
    "mistral3": "[INST][IMG]What is shown?[/INST]",
    "qwen2_5_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n",
}


# Chat templates as the families' Hub checkpoints ship them (trimmed to user turns with one image);
# llava-hf's carries no BOS: its Llama tokenizer adds one. Gemma3's writes the BOS although its tokenizer
# adds one too (HF's apply_chat_template then tokenizes without special tokens).
CHAT_TEMPLATES = {
    "llava": ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
              "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
              "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}"
              "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    # llava-hf/llava-v1.6-mistral-7b-hf: [INST] turns, images first, no BOS (the tokenizer adds it)
    "llava_next": ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
                   "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
                   "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
                   "{{ c['text'] }}{% endfor %}{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                   "{{ message['content'][0]['text'] + '</s>' }}{% endif %}{% endfor %}"),
    # HuggingFaceTB/SmolVLM-Instruct: "User:<image>…<end_of_utterance>", no BOS
    "idefics3": ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
                 "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                 "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                 "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"),
    # mistralai Mistral3 / Pixtral: [INST] turns with [IMG] where the image goes (BOS from the tokenizer here)
    "mistral3": ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}"
                 "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '[IMG]' }}"
                 "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '[/INST]' }}"
                 "{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] + eos_token }}"
                 "{% endif %}{% endfor %}"),
    "gemma3": ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
               "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
               "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
               "{%- set loop_messages = messages -%}{%- endif -%}"
               "{%- for message in loop_messages -%}"
               "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{%- endif -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
               "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
               "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
               "{%- else -%}{%- for item in message['content'] -%}"
               "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
               "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
               "{{ '<end_of_turn>\n' }}{%- endfor -%}"
               "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"),
    # Qwen2.5-VL's (no BOS anywhere: its tokenizer has none), without the video and vision-id branches
    "qwen2_5_vl": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                   "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
                   "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
                   "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
                   "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
                   "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
# Families whose tokenizer adds BOS itself (a post-processor in tokenizer.json), as on the Hub.
ADDS_BOS = ("llava", "llava_next", "gemma3", "mistral3")


def tiny_tokenizer(family: str):
    """A byte-level BPE tokenizer without merges (one token per byte) plus the family's special tokens.

    Every string is encodable and special tokens are split out before byte-level pre-tokenization, so
    the processors' placeholder expansion ("<image>" × n) tokenizes to exactly n image tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, named = FAMILY_SPECIALS[family]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(BASE_SPECIALS + specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS + specials])
    if family in ADDS_BOS:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=dict(named), model_max_length=512)


def _ids(tokenizer) -> dict:
    """Token ids shared by every text config."""
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _tid(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


# --------------------------------------------------------------------------------------------- families


def _llava(tok):
    """LLaVA-1.5 layout: CLIP ViT (features of the penultimate layer, CLS dropped) + MLP + Llama."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(**VISION, image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(**TEXT, **_ids(tok), rms_norm_eps=1e-5, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=_tid(tok, "<image>"),
                         image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            **MEAN_STD)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATES["llava"])
    return LlavaForConditionalGeneration(config), processor


def _llava_next(tok):
    """LLaVA-NeXT: anyres tiling (base view + grid tiles), unpadding and the learned image-newline row."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(**VISION, image_size=32, patch_size=8, projection_dim=32)
    # llava-v1.6-mistral: a Mistral decoder without a sliding window.
    text = MistralConfig(**TEXT, **_ids(tok), sliding_window=None, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=_tid(tok, "<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_seq_length=16)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints, **MEAN_STD)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATES["llava_next"])
    return LlavaNextForConditionalGeneration(config), processor


def _idefics3(tok):
    """Idefics3 / SmolVLM: SigLIP-like encoder, pixel shuffle (scale 2) + linear connector, Llama decoder."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    vision = Idefics3VisionConfig(**VISION, image_size=32, patch_size=8)
    text = LlamaConfig(**TEXT, **_ids(tok), rms_norm_eps=1e-5, tie_word_embeddings=False)
    config = Idefics3Config(vision_config=vision, text_config=text, image_token_id=_tid(tok, "<image>"),
                            scale_factor=2, pad_token_id=tok.pad_token_id)
    # Images fit a 64 px longest edge and split into 32 px crops (1×2, 2×1 or 2×2) plus the 32×32 global
    # view; each view gives (32/8)² / 2² = 4 image tokens.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=True, **MEAN_STD)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATES["idefics3"])
    return Idefics3ForConditionalGeneration(config), processor


def _gemma3(tok):
    """Gemma3: SigLIP + avg-pool projector; decoder with head_dim != hidden/heads, query_pre_attn_scalar,
    (1+w) RMSNorms, q/k norms, sqrt(hidden) embedding scale and sliding-window layers."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(**VISION, image_size=32, patch_size=8)
    text = Gemma3TextConfig(**TEXT, **_ids(tok), head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
                            layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=None)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                          boi_token_index=_tid(tok, "<start_of_image>"), eoi_token_index=_tid(tok, "<end_of_image>"),
                          image_token_index=_tid(tok, "<image_soft_token>"))
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **MEAN_STD)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=CHAT_TEMPLATES["gemma3"])
    model = Gemma3ForConditionalGeneration(config)
    # A random tied head over unit-scale features gives near-flat next-token distributions (greedy margins
    # of 1e-4, and soft targets a draft cannot learn from); a final norm of gain ~10 makes them as peaked
    # as a trained model's.
    with torch.no_grad():
        model.model.language_model.norm.weight.normal_(9.0, 0.1)
    # as on the Hub: an answer ends at <eos> or at the end of the model's turn
    model.generation_config.eos_token_id = [tok.eos_token_id, _tid(tok, "<end_of_turn>")]
    return model, processor


def _mistral3(tok):
    """Mistral3 (Pixtral vision, 2D RoPE over variable image sizes, 2×2 patch merger) + Mistral decoder
    with head_dim != hidden/heads."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessorPil,
        PixtralVisionConfig,
    )

    vision = PixtralVisionConfig(**VISION, image_size=64, patch_size=8)
    text = MistralConfig(**TEXT, **_ids(tok), head_dim=32, sliding_window=None, tie_word_embeddings=False)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=_tid(tok, "[IMG]"),
                            spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8},
                                               **MEAN_STD)
    # PixtralProcessor needs torchvision in transformers 5: its torchvision-free stand-in writes the same
    # files (processor_config.json with patch and merge sizes, chat template)
    from dream_export.processors import PixtralPromptProcessor

    processor = PixtralPromptProcessor(tok, image_processor, patch_size=8, spatial_merge_size=2,
                                       chat_template=CHAT_TEMPLATES["mistral3"])
    return Mistral3ForConditionalGeneration(config), processor


def _qwen2_5_vl(tok):
    """Qwen2.5-VL: windowed ViT with 2D RoPE and 2×2 merger; decoder with QKV bias and 3-section mRoPE."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 8,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 32, "out_hidden_size": 64,
              "fullatt_block_indexes": [1]}
    # head_dim 16 → 8 rotary frequencies, split (temporal, height, width) = (2, 3, 3).
    text = {**TEXT, **_ids(tok), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3]}}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text,
                              image_token_id=_tid(tok, "<|image_pad|>"), video_token_id=_tid(tok, "<|video_pad|>"),
                              vision_start_token_id=_tid(tok, "<|vision_start|>"),
                              vision_end_token_id=_tid(tok, "<|vision_end|>"), tie_word_embeddings=False)
    # min/max pixels keep the grid between 2×2 and 6×6 merged tokens.
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96},
                                               patch_size=8, merge_size=2, temporal_patch_size=2, **MEAN_STD)
    # Qwen2_5_VLProcessor insists on a video processor, which needs torchvision: save the parts instead.
    tok.chat_template = CHAT_TEMPLATES["qwen2_5_vl"]
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [_tid(tok, "<|im_end|>"), _tid(tok, "<|endoftext|>")]
    return model, [tok, image_processor]


BUILDERS: dict[str, Callable] = {"llava": _llava, "llava_next": _llava_next, "idefics3": _idefics3,
                                 "gemma3": _gemma3, "mistral3": _mistral3, "qwen2_5_vl": _qwen2_5_vl}


def _randomize_zero_inits(model) -> None:
    """Give zero-initialised parameters random values so that every path carries signal.

    Gemma3 initialises its (1+w) RMSNorm weights and its projector matrix at zero, and several
    families initialise biases at zero; a parity test on such a model would not notice a missing
    projector or a norm applied as w instead of (1+w).
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.1)


def build_tiny_vlm(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build, randomly initialise and `save_pretrained` a tiny `family` VLM (+ tokenizer/processor).

    Returns `out_dir`, a directory that `AutoConfig`/`AutoProcessor`/`*.from_pretrained` load.
    """
    import torch

    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = tiny_tokenizer(family)
    model, processor = BUILDERS[family](tok)
    _randomize_zero_inits(model)
    model.eval().save_pretrained(out)
    for part in processor if isinstance(processor, list) else [processor]:
        part.save_pretrained(out)
    return out


def tiny_image(width: int = 40, height: int = 30, mode: str = "RGB", seed: int = 0):
    """A deterministic random PIL image (smooth gradients plus noise, so resampling filters matter)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                     (xx + yy) * 255 / max(width + height - 2, 1)], -1)
    img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(img, "RGB")
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(alpha)
        return rgba
    return rgb.convert(mode)


# ------------------------------------------------------------------------------- session cache (pytest)

_CACHE: dict[str, Path] = {}


def cached_tiny_vlm(family: str, root: str | Path) -> Path:
    """`build_tiny_vlm` once per family and process, under `root/<family>` (e.g. a tmp_path_factory dir)."""
    if family not in _CACHE:
        _CACHE[family] = build_tiny_vlm(family, Path(root) / family)
    return _CACHE[family]


# ---------------------------------------------------------------------------------- processor inputs


def processor_inputs(family: str, path: str | Path, image, prompt: str | None = None) -> dict:
    """Model inputs (torch tensors) for one image and prompt, as the family's HF processor builds them.

    Mistral3 and Qwen2.5-VL processors need torchvision in transformers 5, so for them the saved
    image processor runs and the placeholder expansion is reproduced here (same token layout).
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    prompt = PROMPTS[family] if prompt is None else prompt
    if family not in ("mistral3", "qwen2_5_vl"):
        return dict(AutoProcessor.from_pretrained(str(path))(text=prompt, images=image, return_tensors="pt"))
    tok = AutoTokenizer.from_pretrained(str(path))
    pixels = dict(AutoImageProcessor.from_pretrained(str(path))(images=image, return_tensors="pt"))
    if family == "mistral3":
        text = prompt.replace("[IMG]", _pixtral_placeholder(pixels["image_sizes"][0].tolist(), patch=8, merge=2))
    else:
        n = int(pixels["image_grid_thw"][0].prod()) // 4  # merge_size² patches per token
        text = prompt.replace("<|image_pad|>", "<|image_pad|>" * n)
    enc = dict(tok(text, return_tensors="pt", add_special_tokens=False))
    if family == "qwen2_5_vl":
        # 1 marks image tokens: what get_rope_index needs to lay out the 3D (t, h, w) positions.
        enc["mm_token_type_ids"] = (enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    return {**enc, **pixels}


def _pixtral_placeholder(image_size: list[int], patch: int, merge: int) -> str:
    """Pixtral's image layout: one row of [IMG] tokens per merged patch row, [IMG_BREAK] between rows,
    [IMG_END] last (the same string PixtralProcessor builds)."""
    rows, cols = (s // (patch * merge) for s in image_size)
    return "[IMG_BREAK]".join(["[IMG]" * cols] * rows) + "[IMG_END]"
