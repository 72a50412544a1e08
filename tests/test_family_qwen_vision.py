"""Qwen2.5-VL's exported vision graph and the runtime's grid bookkeeping against transformers itself: the
window-attention tower and merger on ONNX Runtime equal `get_image_features` on images whose grids give one
window or several, and the pipeline's mRoPE positions equal `get_rope_index`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dream_export.export.graphs import VisionGraph
from dream_export.families import load_vlm
from dream_export.runtime.image_layout import ImageLayout
from dream_export.runtime.vision_grid import vision_grid_inputs

try:
    from tests.tiny_vlms import cached_tiny_vlm, processor_inputs, tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from tiny_vlms import cached_tiny_vlm, processor_inputs, tiny_image

# grids of 2×2 to 3×6 merged units: one attention window (2×2 units) up to six, edge windows partial
SIZES = [(40, 30), (64, 64), (33, 57), (90, 45), (48, 120), (200, 17)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return cached_tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("tiny_vlms"))


def test_vision_graph_equals_hf_image_features(tmp_path, qwen):
    from dream_export.core.graph_spec import SPECS
    from dream_export.export.bundle import _export
    from dream_export.export.feeds import ort_session

    vlm = load_vlm(qwen)
    layout = ImageLayout.from_manifest({"vision": vlm.vision_layout()[0]}, {})
    first = processor_inputs("qwen2_5_vl", qwen, tiny_image(48, 32))
    feeds = layout.feeds({k: v.numpy() for k, v in first.items()}, 0)
    _export(VisionGraph(vlm).eval(), tuple(torch.from_numpy(v) for v in feeds.values()), tmp_path / "vision.onnx",
            SPECS["vision"], axes={"pixel_values": {0: "patches"}, "image_embeds": {1: "units"}})
    sess = ort_session(tmp_path / "vision.onnx", 1)
    windows, worst = set(), 0.0
    for i, size in enumerate(SIZES):
        enc = processor_inputs("qwen2_5_vl", qwen, tiny_image(*size, seed=i))
        with torch.no_grad():
            ref = vlm.image_features(enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).numpy()
        inputs = {k: v.numpy() for k, v in enc.items()}
        (got,) = sess.run(None, layout.feeds(inputs, 0))
        assert got.shape == (1, layout.count(inputs, 0), ref.shape[-1]) and got.shape[1] == len(ref)
        worst = max(worst, float(np.abs(got[0] - ref).max() / np.abs(ref).max()))
        windows.add(int(layout.feeds(inputs, 0)["window_mask"].sum(1).min() < len(ref) * 4))
    assert worst <= 1e-4, worst
    assert windows == {0, 1}  # images within one window and images across several


def test_grid_bookkeeping_is_transformers(qwen):
    """Window order, rotary positions and segments equal transformers' for several images in one batch."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    vc = load_vlm(qwen).config.vision_config
    grids = [[1, 4, 4], [1, 8, 12], [1, 6, 2]]
    window = vc.window_size // vc.spatial_merge_size // vc.patch_size
    ours = vision_grid_inputs(grids, vc.spatial_merge_size, window)
    index, cu = get_vision_window_index(torch.tensor(grids), vc.spatial_merge_size, vc.window_size, vc.patch_size)
    assert np.array_equal(ours["window_index"], index.numpy())
    assert np.array_equal(ours["patch_positions"], get_vision_position_ids(torch.tensor(grids),
                                                                           vc.spatial_merge_size).numpy())
    seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu.numpy()))  # each patch's window, from cu_seqlens
    assert np.array_equal(ours["window_mask"], seg[:, None] == seg[None, :])
    frame = np.repeat(np.arange(len(grids)), [t * h * w for t, h, w in grids])
    assert np.array_equal(ours["full_mask"], frame[:, None] == frame[None, :])
    assert np.array_equal(ours["window_index"][ours["reverse_index"]], np.arange(len(index)))


def test_positions_of_a_two_image_prompt_are_hf_rope_index(qwen):
    """The runtime's mRoPE positions (what the pipeline feeds the target) over a prompt with two images of
    different grids equal transformers' `get_rope_index`, and generated tokens continue at index + delta."""
    from dream_export.runtime.positions import mrope_positions

    vlm = load_vlm(qwen)
    grids = [[1, 4, 6], [1, 8, 4]]
    img = vlm.image_token_id
    ids = [100, 101, 102] + [img] * 6 + [103, 104] + [img] * 8 + [105]  # byte tokens around the images
    ids_t = torch.tensor([ids])
    ref = vlm.position_ids(ids_t, image_grid_thw=torch.tensor(grids))[:, 0].numpy()
    pos, delta = mrope_positions(ids_t[0].numpy() == img, grids, vlm.config.vision_config.spatial_merge_size)
    assert np.array_equal(pos, ref)
    assert delta == int(ref.max()) + 1 - len(ids)


def test_vision_build_profile_covers_every_image(tmp_path, qwen):
    """The TensorRT build profile of the dynamic vision graph spans the patch grids of images of any size
    (tiny ones enlarged to the minimum pixels, large or extreme ones shrunk to the maximum)."""
    import json

    from dream_export.core.graph_spec import SPECS
    from dream_export.export.bundle import _export, _io
    from dream_export.families import params_from_hf
    from dream_export.runtime.preprocess import ImagePreprocessor
    from dream_export.targets.bundle_builds import _profile, vision_symbols

    try:
        from tests.test_preprocess import TEN_SIZES
    except ImportError:
        from test_preprocess import TEN_SIZES
    from transformers import AutoImageProcessor

    vlm = load_vlm(qwen)
    entry, _ = vlm.vision_layout()
    m = {"vision": entry, "preprocess": json.loads(json.dumps(params_from_hf(AutoImageProcessor.from_pretrained(str(qwen)))))}
    layout, pre = ImageLayout.from_manifest(m, {}), ImagePreprocessor.from_dict(m["preprocess"])
    feeds = layout.feeds(pre.preprocess(tiny_image(48, 32)), 0)
    _export(VisionGraph(vlm).eval(), tuple(torch.from_numpy(v) for v in feeds.values()), tmp_path / "vision.onnx",
            SPECS["vision"], axes={"pixel_values": {0: "patches"}, "image_embeds": {1: "units"}})
    profile = _profile(_io(tmp_path / "vision.onnx"), *vision_symbols(m))
    assert profile["pixel_values"][0] == (16, 384) and profile["pixel_values"][2] == (144, 384)  # 2×2 .. 6×6 units
    for i, (w, h) in enumerate(TEN_SIZES):
        for name, x in layout.feeds(pre.preprocess(tiny_image(w, h, seed=i)), 0).items():
            lo, _, hi = profile[name]
            assert all(a <= d <= b for a, d, b in zip(lo, x.shape, hi, strict=True)), (name, (w, h), x.shape)
