"""The torch-free runtime reproduces the torch reference exactly and behaves well as a library."""

import json
import os
import shutil

import numpy as np
import pytest

from dream_export.demo import scenes
from dream_export.draft.reference import generate
from dream_export.errors import IncompatibleArtifactError, UsageError
from dream_export.runtime.tree import TreeSpec


def _heldout(n):
    data = scenes.heldout(max(1, n // len(scenes.TASKS) + 1))
    return data[:: max(1, len(data) // n)][:n]


@pytest.mark.parametrize("mode", ["tree", "chain", "ar"])
def test_runtime_tokens_equal_torch_reference(demo_pipeline, demo_target, demo_draft, mode):
    for scene, s in _heldout(4):
        img = scenes.render(scene)
        res = demo_pipeline.generate(img, s.prompt, max_new_tokens=60, mode=mode, tree=TreeSpec(4, 6, 32))
        emb, _ = demo_target.prompt_embeds(img, s.prompt)
        ref = generate(demo_target.side, emb, 60, draft=demo_draft, mode=mode, spec=TreeSpec(4, 6, 32),
                       eos_id=demo_target.eos_id)
        assert res.tokens == ref.tokens
        if mode != "ar":
            assert res.stats["tau"] == pytest.approx(ref.tau)


def test_stream_deltas_join_to_the_answer(demo_pipeline):
    scene, s = _heldout(1)[0]
    img = scenes.render(scene)
    deltas = list(demo_pipeline.stream(img, s.prompt, max_new_tokens=40))
    assert len(deltas) > 1
    assert "".join(deltas).strip() == demo_pipeline.generate(img, s.prompt, max_new_tokens=40).text


def test_finish_reasons_and_stop_strings(demo_pipeline):
    scene, s = scenes.make_sample(scenes.HELDOUT_SEED_BASE + 5, "describe")
    img = scenes.render(scene)
    full = demo_pipeline.generate(img, s.prompt, max_new_tokens=128)
    assert full.finish_reason == "stop" and full.tokens[-1] == demo_pipeline.eos_id
    short = demo_pipeline.generate(img, s.prompt, max_new_tokens=5)
    assert short.finish_reason == "length" and len(short.tokens) == 5
    cut = demo_pipeline.generate(img, s.prompt, max_new_tokens=128, stop=["background"])
    assert cut.finish_reason == "stop" and "background" not in cut.text and full.text.startswith(cut.text)


def test_sampling_is_seeded(demo_pipeline):
    scene, s = scenes.make_sample(scenes.HELDOUT_SEED_BASE + 7, "describe")
    img = scenes.render(scene)
    # the demo VLM is near-certain of its descriptions: only a hot, untruncated distribution varies them
    kw = dict(max_new_tokens=40, temperature=2.0, top_p=1.0)
    a = demo_pipeline.generate(img, s.prompt, seed=1, **kw)
    b = demo_pipeline.generate(img, s.prompt, seed=1, **kw)
    assert a.tokens == b.tokens
    assert any(demo_pipeline.generate(img, s.prompt, seed=k, **kw).tokens != a.tokens for k in range(2, 6))


def test_failed_request_leaves_pipeline_ready(demo_pipeline):
    scene, s = _heldout(1)[0]
    img = scenes.render(scene)
    before = demo_pipeline.generate(img, s.prompt, max_new_tokens=30).tokens
    with pytest.raises(UsageError, match="KV capacity"):
        demo_pipeline.generate(img, "tell me " * 300, max_new_tokens=10)
    with pytest.raises(UsageError, match="K,DEPTH,TOTAL"):
        demo_pipeline.generate(img, s.prompt, tree="4x6")
    assert demo_pipeline.generate(img, s.prompt, max_new_tokens=30).tokens == before


def test_bundle_errors_are_clear(demo_bundle, tmp_path):
    from dream_export.runtime.pipeline import Pipeline

    with pytest.raises(UsageError, match="manifest.json missing"):
        Pipeline.load(tmp_path)
    broken = tmp_path / "b"
    shutil.copytree(demo_bundle, broken)
    m = json.loads((broken / "manifest.json").read_text())
    m["format_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleArtifactError, match="format 99"):
        Pipeline.load(broken)


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read resident memory")
def test_memory_is_stable_over_200_generations(demo_pipeline):
    data = _heldout(10)
    images = [scenes.render(sc) for sc, _ in data]
    rss = {}
    for i in range(200):
        sc_img, (_, s) = images[i % len(images)], data[i % len(data)]
        demo_pipeline.generate(sc_img, s.prompt, max_new_tokens=24)
        if i + 1 in (20, 200):
            rss[i + 1] = _rss_kb()
    assert rss[200] <= rss[20] * 1.05, rss


def test_verify_step_host_bytes_do_not_grow_with_context(tmp_path_factory):
    from dream_export.export.bundle import ExportOptions, export_bundle
    from dream_export.runtime.pipeline import Pipeline
    from tests.conftest import DEMO

    out = tmp_path_factory.mktemp("long") / "bundle"
    export_bundle(DEMO / "vlm", DEMO / "draft", out, ExportOptions(kv_capacity=1100, max_tree=32), log=lambda _s: None)
    pipe = Pipeline.load(out)
    eng, be = pipe.engine, pipe.backend
    scene, s = _heldout(1)[0]
    emb, mask, _ = pipe.prompt_embeds(scenes.render(scene), s.prompt)
    per_step = {}
    for ctx in (64, 1024):
        prompt = np.concatenate([emb, np.repeat(emb[-1:], ctx - len(emb), 0)])
        gen = eng.generate(prompt, np.zeros(ctx, bool), max_new_tokens=8, spec=TreeSpec(4, 4, 16))
        next(gen)  # prefill
        be.reset_stats()
        next(gen)  # one round: context pass, tree steps, one verify
        per_step[ctx] = be.bytes_in["target"] / be.calls["target"]
    # the KV cache is bound in place; what crosses per verify is the tree's embeddings, positions and its
    # mask, one bool per (tree node, context slot): only that grows with the context
    print("host bytes per target call", per_step)
    assert per_step[1024] - per_step[64] <= 16 * (1024 - 64) * 1.1, per_step
    assert per_step[1024] < 0.01 * eng.target.key.nbytes, per_step


def test_per_graph_threads_give_the_same_tokens(demo_bundle, demo_pipeline):
    from dream_export.runtime.backends import graph_threads
    from dream_export.runtime.pipeline import Pipeline

    assert graph_threads("target=2,draft=1") == {"vision": 2, "target": 2, "draft": 1}
    assert graph_threads(3) == {"vision": 3, "target": 3, "draft": 3}
    for bad in ("draft=0", "decoder=2", "two"):
        with pytest.raises(UsageError, match="--threads"):
            graph_threads(bad)
    pipe = Pipeline.load(demo_bundle, threads="target=2,draft=1,vision=1")
    assert pipe.backend.threads == {"vision": 1, "target": 2, "draft": 1}
    scene, s = _heldout(1)[0]
    img = scenes.render(scene)
    a = pipe.generate(img, s.prompt, max_new_tokens=40, mode="chain", tree=TreeSpec(1, 5, 6))
    b = demo_pipeline.generate(img, s.prompt, max_new_tokens=40, mode="chain", tree=TreeSpec(1, 5, 6))
    assert a.tokens == b.tokens


def test_bench_sweep_reports_tree_shapes_and_thread_counts(demo_bundle, tmp_path):
    import subprocess
    import sys

    scene, s = _heldout(1)[0]
    scenes.render(scene).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "prompt": s.prompt}) + "\n")
    r = subprocess.run([sys.executable, "-m", "dream_export.cli", "bench", str(demo_bundle), "--data",
                        str(tmp_path / "d.jsonl"), "--max-new-tokens", "16", "--sweep", "--json",
                        str(tmp_path / "b.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["match_rate"] == 1.0 and len(out["sweep"]) == 9
    assert all(r["match_rate"] == 1.0 and r["mode"] == ("chain" if r["tree"][0] == 1 else "tree") for r in out["sweep"])
    assert {t["threads"] for t in out["thread_sweep"]} == {"1", "target=2,draft=1", "2"}
    assert all(t["tree"] == out["sweep"][0]["tree"] for t in out["thread_sweep"])


def _decode(pipe, img, prompt, drafter, max_new_tokens=60):
    """Tokens, accepted per round and graph calls of one greedy request with the given drafter."""
    from dream_export.runtime.engine import EngineStats

    emb, mask, _ = pipe.prompt_embeds(img, prompt)
    stats = EngineStats()
    pipe.backend.reset_stats()
    rounds = list(pipe.engine.generate(emb, mask, max_new_tokens, eos_id=pipe.eos_id, stats=stats, drafter=drafter))
    return [t for r in rounds for t in r.tokens], stats.rounds, dict(pipe.backend.calls)


def test_chain_graph_and_per_step_chain_draft_the_same_tokens(demo_pipeline):
    """One draft_chain call per round (context pass and chain) drafts exactly what per-step calls and the
    k=1 tree draft do; plain decoding is the same loop without a draft."""
    from dream_export.runtime.drafting import ChainGraphDrafter, NoDrafter, StepwiseChainDrafter, TreeDrafter

    eng = demo_pipeline.engine
    steps = demo_pipeline.bundle.graph("draft_chain")["steps"]
    assert "draft_chain" in demo_pipeline.backend.graphs and eng.draft.chain_steps == steps
    # the chain depth comes from the bundle: the chain graph's steps plus the context pass's token
    chosen = eng.drafter("chain")
    assert isinstance(chosen, ChainGraphDrafter) and chosen.spec == TreeSpec.chain(steps + 1)
    assert isinstance(eng.drafter("chain", TreeSpec.chain(steps + 2)), StepwiseChainDrafter)
    assert isinstance(eng.drafter("tree", TreeSpec(4, 6, 32)), TreeDrafter)
    assert isinstance(eng.drafter("ar"), NoDrafter)
    chain = TreeSpec.chain(steps + 1)
    for sc, s in _heldout(3):
        img = scenes.render(sc)
        ar, ar_rounds, ar_calls = _decode(demo_pipeline, img, s.prompt, NoDrafter())
        assert set(ar_rounds) == {1} and ar_calls["target"] == len(ar) and not ar_calls.get("draft")
        graph, graph_rounds, calls = _decode(demo_pipeline, img, s.prompt, ChainGraphDrafter(eng.draft, chain))
        assert calls["draft_chain"] == len(graph_rounds) and not calls.get("draft")
        stepwise, step_rounds, calls = _decode(demo_pipeline, img, s.prompt, StepwiseChainDrafter(eng.draft, chain))
        assert not calls.get("draft_chain") and calls["draft"] == len(step_rounds) * steps + len(step_rounds)
        tree, tree_rounds, _ = _decode(demo_pipeline, img, s.prompt, TreeDrafter(eng.draft, chain))  # k = 1
        assert graph == stepwise == tree == ar
        assert graph_rounds == step_rounds == tree_rounds


def test_target_reads_only_the_used_cache_slots(demo_pipeline, monkeypatch):
    """A mask as wide as the context (rounded up to a slot bucket) gives the logits and KV rows of the
    full-capacity mask."""
    from dream_export.runtime.masks import SLOT_BUCKET

    target = demo_pipeline.engine.target
    assert target.used_slots
    sc, s = _heldout(1)[0]
    emb, _, _ = demo_pipeline.prompt_embeds(scenes.render(sc), s.prompt)
    n = len(emb)
    out = target.run(emb, np.arange(n), np.tril(np.ones((n, n), bool)), np.arange(n), past=0)
    target.commit(out, np.arange(n), 0)
    new = demo_pipeline.engine.embed([5, 6, 7])
    tree = np.tril(np.ones((3, 3), bool))
    narrow = target.run(new, n + np.arange(3), tree, np.arange(3), past=n)
    width = -(-n // SLOT_BUCKET) * SLOT_BUCKET
    assert n <= width < target.capacity and target.out(narrow, "attn_importance").shape == (width + 3,)
    monkeypatch.setattr(target, "used_slots", False)
    full = target.run(new, n + np.arange(3), tree, np.arange(3), past=n)
    for role in ("row_logits", "new_key", "hidden"):
        np.testing.assert_allclose(target.out(narrow, role), target.out(full, role), rtol=1e-5, atol=1e-5)


def test_vtc_keeps_the_image_tokens_the_reference_ranks_highest(demo_pipeline, demo_target, demo_draft):
    """Visual-token compression keeps the image tokens the target's last layer attends to most, as the torch
    reference ranks them, and then drafts exactly what the reference drafts with that stream."""
    import torch

    from dream_export.modeling.decoder import causal_mask
    from dream_export.runtime.tree import causal
    from dream_export.runtime.vtc import vtc_keep_indices

    target = demo_pipeline.engine.target
    for sc, s in _heldout(2):
        img = scenes.render(sc)
        emb, mask, _ = demo_pipeline.prompt_embeds(img, s.prompt)
        n = len(emb)
        got = target.prompt_importance(target.run(emb, np.arange(n), causal(n), [n - 1], past=0), n)
        ref_emb, ref_mask = demo_target.prompt_embeds(img, s.prompt)
        with torch.no_grad():
            pk, pv = demo_target.side.decoder.empty_cache()
            o = demo_target.side.decoder(ref_emb, torch.arange(n)[None], causal_mask(n), pk, pv, output_attentions=True)
        want = o["attn"][-1][0].mean((0, 1)).numpy()  # mean attention each prompt position receives
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        for keep in (0.75, 0.5):
            kept = vtc_keep_indices(mask, got, keep)
            ref_keep = vtc_keep_indices(ref_mask, want, keep)
            assert np.array_equal(kept, ref_keep)
            img_kept = np.intersect1d(kept, np.flatnonzero(mask))
            dropped = np.setdiff1d(np.flatnonzero(mask), kept)
            assert len(dropped) and want[img_kept].min() >= want[dropped].max()
    # the last prompt end to end (the reference decoder is slow on a CPU)
    res = demo_pipeline.generate(img, s.prompt, max_new_tokens=40, tree=TreeSpec(4, 6, 32), vtc_keep=0.5)
    ref = generate(demo_target.side, ref_emb, 40, draft=demo_draft, spec=TreeSpec(4, 6, 32), eos_id=demo_target.eos_id,
                   draft_keep=vtc_keep_indices(mask, want, 0.5))
    assert res.tokens == ref.tokens and res.stats["tau"] == pytest.approx(ref.tau)


def test_cache_masks_step_in_slot_buckets_and_hide_the_padding():
    """Used-slot masks grow in SLOT_BUCKET steps (few distinct shapes for ONNX Runtime's memory plans), from
    one bucket (no zero-size cache slice) up to the capacity, and the padding slots are hidden from every
    query."""
    from dream_export.runtime.masks import SLOT_BUCKET, cache_mask

    new = np.tril(np.ones((3, 3), bool))
    for committed in (0, 1, SLOT_BUCKET - 1, SLOT_BUCKET, SLOT_BUCKET + 5):
        m = cache_mask(4 * SLOT_BUCKET, committed, None, new, used=True)
        width = m.shape[1] - 3
        assert width % SLOT_BUCKET == 0 and max(committed, 1) <= width < max(committed, 1) + SLOT_BUCKET
        assert m[:, :committed].all() and not m[:, committed:width].any() and (m[:, width:] == new).all()
    assert cache_mask(40, 39, None, new, used=True).shape == (3, 43)  # capped at the capacity
    assert cache_mask(40, 5, None, new, used=False).shape == (3, 43)  # full-width graphs: the capacity


def test_any_of_the_eos_ids_ends_the_answer():
    """Families with several end tokens (Gemma3: <eos> and <end_of_turn>) stop at whichever comes first."""
    from dream_export.runtime.accept import SamplingParams
    from dream_export.runtime.engine import EngineStats, RoundState

    st = RoundState(SamplingParams(), frozenset({5, 7}), 10, EngineStats())
    assert st.take([1, 2, 3]) == [1, 2, 3] and not st.done
    assert st.take([4, 7, 5, 6]) == [4, 7] and st.stopped and st.done
    st = RoundState(SamplingParams(), frozenset({5, 7}), 4, EngineStats())
    assert st.take([1, 2, 3, 4, 5]) == [1, 2, 3, 4] and not st.stopped and st.done  # the length limit first
