"""The runtime's numpy image preprocessing against the HF PIL image processors it replaces."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dream_export.errors import IncompatibleArtifactError
from dream_export.families import params_from_hf
from dream_export.runtime.preprocess import ImagePreprocessor, center_crop, shortest_edge_size

try:
    from tests.tiny_vlms import tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from tiny_vlms import tiny_image

# (width, height, mode): portrait, square with alpha, landscape grayscale, odd sizes, palette with
# a transparent entry, and an image smaller than the crop.
IMAGES = [(50, 80, "RGB"), (96, 96, "RGBA"), (300, 200, "L"), (33, 17, "RGB"), (64, 40, "P"), (12, 20, "RGB")]
MEAN_STD = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.3, 0.35]}


def _image(width: int, height: int, mode: str) -> Image.Image:
    if mode != "P":
        return tiny_image(width, height, mode, seed=width)
    img = tiny_image(width, height, "RGB", seed=width).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 3
    return img


def _hf_processors() -> dict:
    from transformers import (
        CLIPImageProcessorPil,
        Gemma3ImageProcessorPil,
        Idefics3ImageProcessorPil,
        LlavaNextImageProcessorPil,
        PixtralImageProcessorPil,
        Qwen2VLImageProcessorPil,
        SiglipImageProcessorPil,
    )

    try:
        from transformers import LlavaImageProcessorPil
    except ImportError:  # older transformers
        LlavaImageProcessorPil = None
    procs = {
        "clip-default": CLIPImageProcessorPil(),  # 224 shortest edge, 224 crop, OpenAI mean/std, bicubic
        "clip-tiny": CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           **MEAN_STD),
        # A crop larger than the resized image: HF zero-pads.
        "clip-pad": CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 48, "width": 40}),
        "clip-fixed-bilinear": CLIPImageProcessorPil(size={"height": 40, "width": 24}, resample=2,
                                                     crop_size={"height": 36, "width": 20}),
        "siglip-default": SiglipImageProcessorPil(),  # 224×224 bicubic, mean/std 0.5
        "siglip-nonsquare": SiglipImageProcessorPil(size={"height": 40, "width": 24}, resample=1),
        "gemma3": Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **MEAN_STD),  # bilinear
        "clip-no-normalize": CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                                                   do_normalize=False),
        "pixtral-default": PixtralImageProcessorPil(),  # never enlarges: only rounds up to 16-px patches
        "pixtral-tiny": PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8},
                                                 **MEAN_STD),
        "qwen2vl-default": Qwen2VLImageProcessorPil(),  # min 56² px: small images are enlarged
        "qwen2vl-tiny": Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96},
                                                 patch_size=8, merge_size=2, **MEAN_STD),
        # 336 px views, pinpoints up to 1008, bicubic
        "llava_next-default": LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                         crop_size={"height": 336, "width": 336}),
        "llava_next-tiny": LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], **MEAN_STD),
        "idefics3-default": Idefics3ImageProcessorPil(),  # 1456 px longest edge, 364 px crops, lanczos
        "idefics3-tiny": Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                   **MEAN_STD),
        "idefics3-nosplit": Idefics3ImageProcessorPil(size={"longest_edge": 48}, max_image_size={"longest_edge": 32},
                                                      do_image_splitting=False, resample=3),
    }
    if LlavaImageProcessorPil is not None:
        procs["llava-nopad"] = LlavaImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 36, "width": 36})
    return procs


PROCS = _hf_processors()


def _assert_same_outputs(ours: dict, ref: dict) -> None:
    # Gemma3 also returns num_crops (all 0 without pan-and-scan): a count for its processor's prompt
    # expansion, not a model input.
    assert not ref.pop("num_crops", np.zeros(1)).any()
    # Idefics3's crop rows and columns lay out the prompt (HF's processor returns them only on request)
    ours = {k: v for k, v in ours.items() if k in ref or k not in ("rows", "cols")}
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert np.abs(ours[key] - value).max() <= 1e-5, key


@pytest.mark.parametrize("name", sorted(PROCS))
@pytest.mark.parametrize("width,height,mode", IMAGES)
def test_numpy_preprocessing_matches_hf_pil_processor(name, width, height, mode):
    hf = PROCS[name]
    image = _image(width, height, mode)
    params = json.loads(json.dumps(params_from_hf(hf)))  # through JSON, as in a bundle
    ours = ImagePreprocessor.from_dict(params).preprocess(image)
    _assert_same_outputs(ours, dict(hf(images=image, return_tensors="np")))
    assert ours["pixel_values"].dtype == np.float32


@pytest.mark.parametrize("name", ["pixtral-tiny", "qwen2vl-tiny", "gemma3", "llava_next-tiny", "idefics3-tiny"])
def test_batches_match_hf(name):
    """Pixtral pads a batch to its largest image; Qwen2-VL concatenates the patches of all images; LLaVA-NeXT
    and Idefics3 pad each image's views to the most views in the batch."""
    hf = PROCS[name]
    images = [_image(*spec) for spec in IMAGES[:3]]
    ours = ImagePreprocessor.from_dict(params_from_hf(hf)).preprocess(images)
    # Idefics3 reads a flat list as one prompt's images (their views concatenated): one list per image
    batch = [[im] for im in images] if name.startswith("idefics3") else images
    _assert_same_outputs(ours, dict(hf(images=batch, return_tensors="np")))


def test_batch_and_kinds():
    params = params_from_hf(PROCS["clip-tiny"])
    assert params["kind"] == "clip" and params["resample"] == 3
    assert params_from_hf(PROCS["gemma3"])["kind"] == "siglip" and params_from_hf(PROCS["gemma3"])["resample"] == 2
    pre = ImagePreprocessor.from_dict(params)
    batch = pre([_image(50, 80, "RGB"), _image(300, 200, "L")])
    assert batch.shape == (2, 3, 32, 32) and batch.flags.c_contiguous
    assert np.array_equal(batch[1], pre(_image(300, 200, "L"))[0])


def test_array_inputs_match_pil_inputs():
    pre = ImagePreprocessor.from_dict(params_from_hf(PROCS["clip-tiny"]))
    img = _image(50, 80, "RGB")
    assert np.array_equal(pre(np.asarray(img)), pre(img))
    gray = _image(300, 200, "L")
    assert np.array_equal(pre(np.asarray(gray)), pre(gray))


def test_resize_rounding_and_crop_padding():
    # int(), not round(): 32 * 80 / 50 = 51.2 → 51; 32 * 47 / 30 = 50.13 → 50.
    assert shortest_edge_size(80, 50, 32) == (51, 32)
    assert shortest_edge_size(30, 47, 32) == (32, 50)
    chw = np.ones((3, 5, 4), dtype=np.uint8)
    out = center_crop(chw, 8, 6)
    assert out.shape == (3, 8, 6) and out.sum() == 3 * 5 * 4 and out[:, 0].sum() == 0


def test_bad_parameters_are_refused():
    good = params_from_hf(PROCS["siglip-default"])
    with pytest.raises(IncompatibleArtifactError, match="kind"):
        ImagePreprocessor.from_dict({**good, "kind": "llava_next_anyres"})
    with pytest.raises(IncompatibleArtifactError, match="patch_size"):
        ImagePreprocessor.from_dict({**good, "kind": "qwen2_vl"})
    with pytest.raises(IncompatibleArtifactError, match="cannot resize"):
        ImagePreprocessor.from_dict({**good, "size": {"shortest_edge": 32}})
    clip = params_from_hf(PROCS["clip-tiny"])
    with pytest.raises(IncompatibleArtifactError, match="cannot resize"):
        ImagePreprocessor.from_dict({**clip, "size": {"shortest_edge": 32, "longest_edge": 64}})
    with pytest.raises(IncompatibleArtifactError, match="lack"):
        ImagePreprocessor.from_dict({k: v for k, v in good.items() if k != "image_mean"})


def test_imports_without_torch_or_transformers():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import dream_export.runtime.preprocess as p, dream_export.runtime\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print(p.ImagePreprocessor.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ImagePreprocessor"


def test_minimal_parameter_dict():
    """Switches left out default to on, as in HF processors (older bundles wrote only the values)."""
    full = params_from_hf(PROCS["clip-tiny"])
    minimal = {k: full[k] for k in ("kind", "size", "crop_size", "image_mean", "image_std", "rescale_factor",
                                    "resample")}
    image = _image(50, 80, "RGB")
    assert np.array_equal(ImagePreprocessor.from_dict(minimal)(image), ImagePreprocessor.from_dict(full)(image))


# Ten sizes and aspect ratios: landscape, square, portrait, 2:1, 1:2.5, odd, very wide, very tall, near
# square and tiny (each family tiles, splits or crops them differently).
TEN_SIZES = [(40, 30), (64, 64), (33, 57), (90, 45), (48, 120), (31, 31), (200, 17), (17, 200), (101, 100), (7, 9)]
# The families whose preprocessing the runtime reproduces, as their saved checkpoints carry it.
REPRODUCED = ("llava", "llava_next", "idefics3", "mistral3", "qwen2_5_vl")


@pytest.fixture(scope="module")
def saved_processors(tmp_path_factory):
    from transformers import AutoImageProcessor

    try:
        from tests.tiny_vlms import build_tiny_vlm
    except ImportError:
        from tiny_vlms import build_tiny_vlm
    root = tmp_path_factory.mktemp("families")
    return {f: AutoImageProcessor.from_pretrained(str(build_tiny_vlm(f, root / f))) for f in REPRODUCED}


@pytest.mark.parametrize("family", REPRODUCED)
def test_family_preprocessing_equals_the_saved_hf_processor(family, saved_processors):
    """The runtime's pixels (and image sizes, view masks, crop grid) equal the checkpoint's own HF image
    processor on ten images of different sizes and aspect ratios: the max difference is 0 (the same
    Pillow resampling on the same uint8 pixels), well inside 1e-4."""
    hf = saved_processors[family]
    pre = ImagePreprocessor.from_dict(json.loads(json.dumps(params_from_hf(hf))))
    worst = 0.0
    for i, (w, h) in enumerate(TEN_SIZES):
        image = tiny_image(w, h, seed=i)
        ref = dict(hf(images=image, return_tensors="np", **({"return_row_col_info": True} if family == "idefics3"
                                                             else {})))
        ours = pre.preprocess(image)
        for key in ("rows", "cols"):  # HF nests them per prompt
            if key in ref:
                assert np.array_equal(np.ravel(ref.pop(key)), ours.pop(key)), key
        _assert_same_outputs(ours, ref)
        worst = max(worst, float(np.abs(ours["pixel_values"] - ref["pixel_values"]).max()))
    assert worst <= 1e-4
