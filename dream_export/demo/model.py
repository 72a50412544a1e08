"""The demo VLM's architecture, tokenizer and processor: a real `LlavaForConditionalGeneration`.

Shape rationale (measured with ONNX Runtime on 2 CPU cores): a deep, narrow decoder (24 layers × 128)
costs about the same to verify 16 tokens as to produce one (memory- and overhead-bound), while a
3-block draft at the same width is ~10× cheaper per step; that is the regime where speculative decoding
pays on an edge GPU as well. A 12 × 256 decoder has a worse verify/decode ratio for the same budget.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
PATCH_SIZE = 32
VOCAB_SIZE = 1024


def demo_shape() -> dict:
    """Hyper-parameters of the demo VLM (vision tower, projector, decoder)."""
    return {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "image_size": 96, "patch_size": PATCH_SIZE},
        "text": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 24,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
    }


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Fit a byte-level BPE tokenizer on the demo corpus and wrap it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_processor(tokenizer):
    """LLaVA processor: CLIP-style image preprocessing at 96×96 and `<image>` expansion to 9 tokens."""
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # torchvision-free in transformers 5
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as ImageProcessor
    size = demo_shape()["vision"]["image_size"]
    image_processor = ImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0):
    """A freshly initialised demo LLaVA (CLIP vision tower + MLP projector + Llama decoder)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    shape = demo_shape()
    vision = CLIPVisionConfig(**shape["vision"], projection_dim=128)
    text = LlamaConfig(**shape["text"], vocab_size=len(tokenizer), rms_norm_eps=1e-5,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    # "full" keeps the CLIP CLS token: one image token that summarises the scene (counts), plus 9 cells
    n_img = (shape["vision"]["image_size"] // PATCH_SIZE) ** 2 + 1
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_img, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model


def load_demo(path: str | Path, dtype=None):
    """Load a saved demo VLM and its processor through the same `from_pretrained` path as any checkpoint."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(str(path))
    return model, processor
