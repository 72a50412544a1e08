"""DREAM-S pieces: the visual-token score by per-query maximum, the intermediate-layer rules, feature noise."""

import numpy as np
import pytest
import torch

from dream_export.demo import scenes
from dream_export.draft.data import DataConfig, select_intermediate
from dream_export.draft.train import feature_noise
from dream_export.runtime.vtc import vtc_keep_indices


def test_max_score_ranks_image_tokens_as_the_reference_and_is_a_runtime_choice(demo_pipeline, demo_target):
    """The exported target's DREAM-S score is the reference's per-query maximum of the last layer's attention,
    and choosing it changes which image tokens the draft keeps (the column mean ranks them differently)."""
    from dream_export.modeling.decoder import causal_mask
    from dream_export.runtime.tree import causal

    target = demo_pipeline.engine.target
    sc, s = scenes.heldout(1)[0]
    img = scenes.render(sc)
    emb, mask, _ = demo_pipeline.prompt_embeds(img, s.prompt)
    n = len(emb)
    out = target.run(emb, np.arange(n), causal(n), [n - 1], past=0)
    got = target.prompt_importance(out, n, "max")
    ref_emb, _ = demo_target.prompt_embeds(img, s.prompt)
    with torch.no_grad():
        pk, pv = demo_target.side.decoder.empty_cache()
        o = demo_target.side.decoder(ref_emb, torch.arange(n)[None], causal_mask(n), pk, pv, output_attentions=True)
    want = o["attn"][-1][0].amax((0, 1)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    kept = vtc_keep_indices(mask, got, 0.5)
    img_kept, dropped = np.intersect1d(kept, np.flatnonzero(mask)), np.setdiff1d(np.flatnonzero(mask), kept)
    assert want[img_kept].min() >= want[dropped].max()
    target.vtc_score = "max"
    try:
        assert np.array_equal(target.prompt_importance(out, n), got)
    finally:
        target.vtc_score = "mean"
    mean_kept = vtc_keep_indices(mask, target.prompt_importance(out, n), 0.5)
    assert not np.array_equal(kept, mean_kept)
    with pytest.raises(ValueError, match="unknown visual-token score"):
        target.prompt_importance(out, n, "median")


def _uniform_attention(widths: list[int], t: int = 64) -> list[torch.Tensor]:
    """One head per layer whose every query spreads evenly over `w` keys: entropy log(w) per layer."""
    out = []
    for w in widths:
        a = torch.zeros(1, t, t)
        a[..., :w] = 1.0 / w
        out.append(a)
    return out


def test_dream_s_rules():
    """The stored code's rule is plain argmin entropy over layers 1..0.98L-2; the paper's adds the
    cross-layer change, and layer 1 is not exempt from it (a steep entropy drop there is not stable)."""
    widths = [4, 40, 30, 30, 30, 30, 30, 30, 30, 30, 2, 2]  # 12 layers: window 1..int(11.76)-2 = 1..9
    attns = _uniform_attention(widths)
    code = select_intermediate(attns, DataConfig(mid_select="dream-s-code"))
    assert set(code) == {1}  # layers 11, 12 have the lowest entropy but lie outside the window
    paper = select_intermediate(attns, DataConfig(mid_select="dream-s"))
    # the first layer of the flat stretch (4: no change on either side), not layer 1 with its steep change
    assert set(paper) == {4}
    dream = select_intermediate(attns, DataConfig(mid_select="dream"))  # 1..0.4L = 1..5
    assert set(dream) == {1}


def test_feature_noise_scales_with_512_over_length():
    """EAGLE/DREAM's augmentation: uniform noise of width std·512/seq_len."""
    torch.manual_seed(0)
    for t in (64, 256, 1024):
        n = feature_noise(torch.zeros(t, 32), 0.2)
        half = 0.2 * 512 / t / 2
        assert n.abs().max() <= half
        assert n.abs().max() > 0.9 * half
