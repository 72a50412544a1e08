"""SmoothQuant keeps the fp32 function and flattens the quantized activations' channels."""

from __future__ import annotations

import json

import numpy as np

try:
    from tests.calib_fixture import prompt_files
except ImportError:  # tests/ itself on sys.path
    from calib_fixture import prompt_files


def test_smoothing_is_function_preserving_and_flattens_channels(demo_bundle):
    import onnx
    import onnxruntime as ort

    from dream_export.calib.capture import capture_feeds
    from dream_export.calib.select import select_nodes
    from dream_export.calib.smoothquant import channel_amax, smooth
    from dream_export.core.prompts import read_prompts

    calib, _ = prompt_files(demo_bundle.parent / "prompts-sq")
    feeds = capture_feeds(demo_bundle, read_prompts(calib)[:2], samples=4, max_new_tokens=16,
                          progress=False).feeds["draft"]
    m = json.loads((demo_bundle / "manifest.json").read_text())
    src = onnx.load(str(demo_bundle / "onnx" / "draft.onnx"))
    sel = select_nodes(src, m["dims"]["vocab"], [], {m["graphs"]["draft"]["bindings"]["embeds"]})
    before_x = {n.name: n.input[0] for n in src.graph.node if n.name in sel.quantize}
    amax_before = channel_amax(src, sorted(set(before_x.values())), feeds)
    model, info = smooth(onnx.load(str(demo_bundle / "onnx" / "draft.onnx")), sel.quantize, feeds, alpha=0.5)
    assert info["groups"] >= 8 and info["groups"] == info["folded"] + info["mul_nodes"]
    onnx.checker.check_model(model)

    def run(mp):
        sess = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        have = {i.name for i in sess.get_inputs()}
        return [dict(zip(names, sess.run(names, {k: v for k, v in f.items() if k in have}), strict=True))
                for f in feeds]

    ref, got = run(src), run(model)
    for r, g in zip(ref, got, strict=True):
        for k in ("feature", "new_self_key", "topk_logprobs"):
            assert np.max(np.abs(r[k] - g[k])) <= 1e-3 * max(np.max(np.abs(r[k])), 1.0)
    # the linears' inputs are flatter across channels after smoothing (max/median of channel maxima)
    after_x = {n.name: n.input[0] for n in model.graph.node if n.name in sel.quantize}
    amax_after = channel_amax(model, sorted(set(after_x.values())), feeds)
    spread = lambda a: float(np.max(a) / np.median(a))  # noqa: E731
    flatter = [spread(amax_after[after_x[n]]) < spread(amax_before[before_x[n]]) for n in before_x]
    assert np.mean(flatter) > 0.7
