"""The runtime's image layout writes each image's placeholder exactly as the family's HF processor does:
the prompt ids equal the processor's on ten image sizes (LLaVA-NeXT's token count from the tiling and
unpadding, Idefics3's crop and global markers, Pixtral's rows, Gemma3's <start_of_image> block,
Qwen2.5-VL's merged units), and an image-dependent count without the image is refused clearly."""

from __future__ import annotations

import numpy as np
import pytest

from dream_export.errors import UsageError

try:
    from tests.test_preprocess import TEN_SIZES
    from tests.tiny_vlms import PROMPTS, build_tiny_vlm, tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from test_preprocess import TEN_SIZES
    from tiny_vlms import PROMPTS, build_tiny_vlm, tiny_image

FAMILIES = ("llava_next", "idefics3", "mistral3", "gemma3", "qwen2_5_vl")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {f: build_tiny_vlm(f, root / f) for f in FAMILIES}


def _layout(path):
    """The runtime pieces a bundle of this checkpoint carries: preprocessing, layout, tokenizer."""
    from dream_export.families import load_processor, load_vlm, params_from_hf
    from dream_export.runtime.image_layout import ImageLayout
    from dream_export.runtime.preprocess import ImagePreprocessor

    vlm, proc = load_vlm(path), load_processor(path)
    entry, tensors = vlm.vision_layout()
    if entry["layout"] == "split":
        entry["rows_per_view"] = proc.image_seq_len
    elif entry["layout"] == "single":
        entry["rows_per_view"] = proc.image_seq_length
    elif entry["layout"] == "anyres":
        entry["rows_per_view"] = entry["grid"] ** 2
    layout = ImageLayout.from_manifest({"vision": entry}, {k: v.numpy() for k, v in tensors.items()})
    return proc, ImagePreprocessor(params_from_hf(proc.image_processor)), layout


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_ids_equal_the_processor(family, checkpoints):
    proc, pre, layout = _layout(checkpoints[family])
    image_token = {"mistral3": "[IMG]", "gemma3": "<image_soft_token>", "qwen2_5_vl": "<|image_pad|>"}.get(family, "<image>")
    placeholder = layout.placeholder(image_token)  # what the chat template writes
    for i, (w, h) in enumerate(TEN_SIZES):
        image = tiny_image(w, h, seed=i)
        want = proc(text=PROMPTS[family], images=image, return_tensors="np")["input_ids"][0].tolist()
        text = PROMPTS[family].replace(placeholder, layout.text(pre.preprocess(image), 0, image_token))
        assert proc.tokenizer(text)["input_ids"] == want, (w, h)
        assert layout.count(pre.preprocess(image)) == int(np.sum(np.array(want) == proc.tokenizer.convert_tokens_to_ids(
            image_token)))


def test_an_image_dependent_count_needs_the_image(checkpoints):
    _, _, layout = _layout(checkpoints["llava_next"])
    assert layout.variable
    with pytest.raises(UsageError, match="pass the image"):
        layout.count(None)
