"""Qwen2.5-VL's decoder as exported: the target graph takes the 3-D mRoPE positions the runtime computes
(numpy, `runtime.positions`), and on ONNX Runtime reproduces the HF model's own forward at prefill and
its greedy `generate` after it, positions continuing from the prompt's rope delta."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dream_export.families import load_vlm
from dream_export.runtime.masks import prefill_mask
from dream_export.runtime.positions import mrope_positions

try:
    from tests.tiny_vlms import cached_tiny_vlm, processor_inputs, tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from tiny_vlms import cached_tiny_vlm, processor_inputs, tiny_image

SIZES = [(90, 45), (33, 57), (64, 64)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return cached_tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("tiny_vlms"))


def _inputs(path, size):
    enc = processor_inputs("qwen2_5_vl", path, tiny_image(*size, seed=size[0]))
    return enc, {k: v for k, v in enc.items() if k not in ("input_ids", "pixel_values")}


@pytest.mark.parametrize("size", SIZES)
def test_runtime_positions_are_hf_rope_index(qwen, size):
    vlm = load_vlm(qwen)
    enc, extras = _inputs(qwen, size)
    ref = vlm.position_ids(enc["input_ids"], **extras)[:, 0].numpy()
    pos, delta = mrope_positions(vlm.image_token_mask(enc["input_ids"])[0].numpy(), enc["image_grid_thw"].tolist(),
                                 vlm.config.vision_config.spatial_merge_size)
    assert np.array_equal(pos, ref)
    assert delta == ref.max() + 1 - ref.shape[1] < 0  # an image advances positions by its side, not its area


def test_exported_target_follows_hf_forward_and_generate(tmp_path, qwen):
    from dream_export.core.graph_spec import SPECS
    from dream_export.export.bundle import _export
    from dream_export.export.feeds import ort_session
    from dream_export.export.graphs import TargetGraph

    vlm = load_vlm(qwen)
    vlm.model.generation_config.eos_token_id = None  # greedy through EOS: every answer has `new` tokens
    f = vlm.facts
    cap, new = 128, 16
    graph = TargetGraph(vlm.decoder(), vlm.lm_head, topk=4).eval()
    kv = (f.num_layers, 1, f.num_kv_heads, cap, f.head_dim)
    t = 4
    args = (torch.zeros(1, t, f.hidden_size), torch.arange(t)[None].expand(3, t),
            torch.ones(1, t, cap + t, dtype=torch.bool), torch.zeros(kv), torch.zeros(kv), torch.tensor([t - 1]))
    _export(graph, args, tmp_path / "target.onnx", SPECS["target"])
    sess = ort_session(tmp_path / "target.onnx", 1)
    names = [o.name for o in sess.get_outputs()]
    have = {i.name for i in sess.get_inputs()}

    def run(embeds, pos, mask, past_k, past_v):
        feeds = {"inputs_embeds": embeds[None].astype(np.float32), "position_ids": np.ascontiguousarray(pos),
                 "attention_mask": mask[None], "past_key": past_k, "past_value": past_v,
                 "logit_rows": np.arange(len(embeds))}
        return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in have}), strict=True))

    for size in SIZES[:2]:
        enc, extras = _inputs(qwen, size)
        ids = enc["input_ids"]
        with torch.no_grad():
            ref = vlm.model(**enc)
            want = vlm.model.generate(**enc, max_new_tokens=new, do_sample=False)[0, ids.shape[1]:].numpy()
            prompt = vlm.merge(ids, enc["pixel_values"], **extras)[0].numpy()
            answer = vlm.embed_text(torch.from_numpy(want[:-1])[None])[0].numpy()
        img = vlm.image_token_mask(ids)[0].numpy()
        n = len(img)
        pos, delta = mrope_positions(img, enc["image_grid_thw"].tolist(), vlm.config.vision_config.spatial_merge_size)
        mask = np.zeros((n, cap + n), bool)
        mask[:, cap:] = prefill_mask(img, False)
        zeros = np.zeros(kv, np.float32)
        pre = run(prompt, pos, mask, zeros, zeros)
        hf = ref.logits[0].numpy()
        assert np.abs(pre["row_logits"] - hf).max() <= 1e-4 * np.abs(hf).max()
        # the answer verified in one call after the committed prompt, at positions n + delta + i
        past_k, past_v = zeros.copy(), zeros.copy()
        past_k[..., :n, :], past_v[..., :n, :] = pre["new_key"], pre["new_value"]
        m = len(answer)
        vmask = np.zeros((m, cap + m), bool)
        vmask[:, :n] = True
        vmask[:, cap:] = np.tril(np.ones((m, m), bool))
        ver = run(answer, np.broadcast_to(n + delta + np.arange(m), (3, m)), vmask, past_k, past_v)
        got = [int(pre["topk_ids"][-1, 0])] + ver["topk_ids"][:, 0].tolist()
        assert len(want) == new and got == want.tolist()
