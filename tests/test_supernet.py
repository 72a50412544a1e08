"""DREAM-S supernet: pruned sub-networks equal the masked supernet, stay lossless, and the search picks one
the runtime then uses."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dream_export.draft.supernet import (
    SupernetSpec,
    head_choices,
    head_mask,
    kept_heads,
    last_layers,
    parse_subnet,
    prune,
)
from dream_export.runtime.subnet import SubNet
from dream_export.runtime.tree import TreeSpec
from tests.conftest import DEMO

# a ranking that is not the identity: pruning must map each kept query head to its own KV head
HEAD_ORDER = [2, 0, 3, 1]


def _spec(draft) -> SupernetSpec:
    c = draft.config
    return SupernetSpec(c.num_heads, c.num_kv_heads, HEAD_ORDER, [0.0] * c.num_heads, head_choices(c.num_heads),
                        [0.5, 1.0], last_layers(c.target_num_layers))


@pytest.fixture(scope="module")
def supernet_dir(tmp_path_factory, demo_draft):
    """The demo draft as a supernet (its weights, a head ranking and the knobs' choices)."""
    d = tmp_path_factory.mktemp("supernet") / "draft"
    shutil.copytree(DEMO / "draft", d)
    (d / "supernet.json").write_text(json.dumps(asdict(_spec(demo_draft))))
    return d


@pytest.fixture(scope="module")
def supernet_bundle(tmp_path_factory, supernet_dir):
    """A bundle with every head variant's draft graphs and the injectable layers exposed."""
    from dream_export.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("sn") / "bundle"
    export_bundle(DEMO / "vlm", supernet_dir, out, ExportOptions(kv_capacity=128, max_tree=16, chain_steps=2),
                  log=lambda _s: None)
    return out


def _draft_inputs(cfg, t=5, c=6, cap=8):
    g = torch.Generator().manual_seed(0)
    h, kv, d = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    p = 3  # used cache rows
    self_mask = torch.ones(1, t, p + t, dtype=torch.bool)
    self_mask[:, :, p:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return {"embeds": torch.randn(1, t, h, generator=g), "positions": torch.arange(p, p + t)[None],
            "self_mask": self_mask, "self_key": torch.randn(2, 1, kv, cap, d, generator=g),
            "self_value": torch.randn(2, 1, kv, cap, d, generator=g),
            "cross_key": torch.randn(1, kv, cap, d, generator=g), "cross_value": torch.randn(1, kv, cap, d, generator=g),
            "new_feats": torch.randn(1, 2, h, generator=g), "cross_mask": torch.ones(1, t, c, dtype=torch.bool),
            "prev_feat": torch.zeros(1, t, h)}


def test_pruned_subnetwork_graph_equals_masked_supernet(supernet_bundle, demo_draft, demo_target):
    """Each exported head variant (physically pruned, uneven KV groups for 3 heads) computes what the
    supernet computes with the other heads masked, in torch and in ONNX Runtime."""
    import onnxruntime as ort

    from dream_export.core.graph_spec import SPECS
    from dream_export.export.graphs import DraftGraph

    spec = _spec(demo_draft)
    man = json.loads((supernet_bundle / "manifest.json").read_text())
    assert man["supernet"]["main_heads"] == 4 and sorted(man["supernet"]["variants"]) == ["1", "2", "3"]
    feeds = _draft_inputs(demo_draft.config, cap=man["draft_capacity"])
    graph = DraftGraph(demo_draft, demo_target.side.lm_head, man["topk"]).eval()
    for heads in (1, 2, 3):
        pruned = prune(demo_draft, spec, heads)
        assert len(pruned.config.last_block_heads) == heads
        with torch.no_grad(), head_mask(demo_draft, kept_heads(spec, heads)):
            want = graph(*feeds.values())
        with torch.no_grad():
            got_torch = DraftGraph(pruned, demo_target.side.lm_head, man["topk"]).eval()(*feeds.values())
        entry = man["supernet"]["variants"][str(heads)]["draft"]
        sess = ort.InferenceSession(str(supernet_bundle / entry["file"]), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})
        out_names = SPECS["draft"].output_names(present=())
        for name, w, gt, go in zip(out_names, want, got_torch, got, strict=True):
            if w.dtype == torch.int64:  # top-k ids: equal where the log-probs are not tied
                continue
            np.testing.assert_allclose(gt.numpy(), w.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"torch {name}")
            np.testing.assert_allclose(go, w.numpy(), rtol=1e-3, atol=1e-4, err_msg=f"onnx {name}")
        # a pruned head's absence matters: the masked output differs from the full network's
        with torch.no_grad():
            assert not torch.allclose(graph(*feeds.values())[0], want[0], atol=1e-5)


def test_subnet_export_is_lossless(tmp_path, supernet_dir):
    """`export --subnet` writes only the pruned sub-network (parity checked against its pruned draft), the
    runtime reads the chosen layer and keep ratio from the manifest, and speculation stays lossless."""
    from dream_export.cli import cli
    from dream_export.demo import scenes
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.tree import TreeSpec

    out = tmp_path / "subnet"
    res = CliRunner().invoke(cli, ["export", str(DEMO / "vlm"), "--draft", str(supernet_dir), "-o", str(out),
                                   "--kv-capacity", "128", "--max-tree", "16", "--chain-steps", "2",
                                   "--subnet", "heads=0.75,vtc_keep=0.5,layer=22,tree=2,4,8"])
    assert res.exit_code == 0, res.output
    assert "parity draft  fp32" in res.output and "FAILED" not in res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["supernet"]["chosen"] == {"heads": 3, "vtc_keep": 0.5, "layer": 22, "tree": "2,4,8"}
    assert man["supernet"]["taps"] == [22] and man["supernet"]["variants"] == {}
    pipe = Pipeline.load(out, threads=1)
    assert pipe.engine.vtc_keep == 0.5 and pipe.engine.target.feature_columns is not None
    # the chosen drafting shape is what a request without mode/tree drafts; naming one still wins
    assert pipe.engine.default_drafting() == ("tree", TreeSpec(2, 4, 8))
    assert pipe.engine.default_drafting("chain") == ("chain", TreeSpec.chain(3))
    assert pipe.engine.default_drafting("tree", TreeSpec(4, 3, 12)) == ("tree", TreeSpec(4, 3, 12))
    for sc, s in scenes.heldout(2):
        img = scenes.render(sc)
        ar = pipe.generate(img, s.prompt, mode="ar", max_new_tokens=24)
        for mode in ("chain", "tree", None):
            sp = pipe.generate(img, s.prompt, mode=mode, tree=None if mode is None else TreeSpec(2, 4, 8),
                               max_new_tokens=24)
            assert sp.tokens == ar.tokens, mode
            assert sp.stats["tau"] > 1.0
            assert sp.stats["mode"] == (mode or "tree")
            if mode is None:  # the chosen 2,4,8 tree: never more than depth + 1 tokens a round
                assert max(sp.stats["rounds"]) <= 5


def _spec_of(bundle) -> SupernetSpec:
    """The supernet spec a bundle's manifest records (what `export --subnet` parses against)."""
    sn = json.loads((bundle / "manifest.json").read_text())["supernet"]
    return SupernetSpec(sn["num_heads"], sn["num_heads"], sn["head_order"], [0.0] * sn["num_heads"],
                        sn["head_choices"], sn["vtc_keeps"], sn["layers"])


def _prompts(tmp_path, n=2):
    from dream_export.demo import scenes

    rows = []
    for i, (sc, s) in enumerate(scenes.heldout(n)):
        p = tmp_path / f"img{i}.png"
        scenes.render(sc).save(p)
        rows.append({"image": str(p), "prompt": s.prompt})
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_search_writes_a_choice_the_runtime_uses(tmp_path, supernet_bundle):
    """A tiny search returns the report's schema with a front, writes its choice into the manifest, and the
    runtime then runs that sub-network (its draft graphs, injected layer and keep ratio), losslessly."""
    from dream_export.cli import cli
    from dream_export.runtime.pipeline import Pipeline
    from dream_export.runtime.subnet import feature_columns

    bundle = tmp_path / "bundle"
    shutil.copytree(supernet_bundle, bundle)
    data, out = _prompts(tmp_path), tmp_path / "search.json"
    res = CliRunner().invoke(cli, ["search", str(bundle), "--target", "h100", "--data", str(data), "--json", str(out),
                                   "--first-rung", "1", "--max-prompts", "2", "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    assert "Pareto front" in res.output
    rep = json.loads(out.read_text())
    assert set(rep["chosen"]["config"]) == {"heads", "vtc_keep", "layer", "tree"}
    assert isinstance(rep["chosen"]["speedup"], float) and isinstance(rep["full"]["speedup"], float)
    # the full draft at the bundle's chain (chain_steps 2: depth 3); shapes beyond max_tree 16 left out
    assert rep["full"]["config"] == {"heads": 4, "vtc_keep": 1.0, "layer": 24, "tree": "1,3,4"}
    assert rep["shapes"][0] == "1,3,4" and all(TreeSpec.parse(t).total <= 16 for t in rep["shapes"])
    assert len(rep["shapes"]) > 1 and {r["config"]["tree"] for r in rep["all"]} == set(rep["shapes"])
    assert parse_subnet(rep["chosen"]["subnet"], _spec_of(bundle)) == SubNet(**rep["chosen"]["config"])
    assert rep["front"] and rep["chosen"]["prompts"] == rep["full"]["prompts"] == 2
    assert rep["chosen"]["tokens_per_s"] >= rep["full"]["tokens_per_s"]
    assert rep["lossless"]
    chosen = rep["chosen"]["config"]
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["supernet"]["chosen"] == chosen
    pipe = Pipeline.load(bundle, threads=1)
    if chosen["heads"] != 4:
        assert pipe.bundle.graph("draft")["file"] == f"onnx/draft.h{chosen['heads']}.onnx"
    assert pipe.engine.target.feature_columns == feature_columns(man, chosen["layer"])
    assert pipe.engine.vtc_keep == (chosen["vtc_keep"] if chosen["vtc_keep"] < 1 else None)
    shape = TreeSpec.parse(chosen["tree"])
    assert pipe.engine.default_drafting() == ("chain" if shape.k == 1 else "tree", shape)
    row = json.loads(data.read_text().splitlines()[0])
    from dream_export.runtime.preprocess import load_image

    img = load_image(row["image"]).convert("RGB")
    assert pipe.generate(img, row["prompt"], max_new_tokens=16).tokens == \
        pipe.generate(img, row["prompt"], mode="ar", max_new_tokens=16).tokens
    # `bench` without --mode/--tree benches the chosen shape
    bj = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(bundle), "--data", str(data), "--limit", "1", "--max-new-tokens", "8",
                                   "--threads", "1", "--json", str(bj)])
    assert res.exit_code == 0, res.output
    settings = json.loads(bj.read_text())["settings"]
    assert settings["tree"] == [shape.k, shape.depth, shape.total]
    assert settings["mode"] == ("chain" if shape.k == 1 else "tree")


def test_seeded_search_is_reproducible(tmp_path, supernet_bundle):
    """Two searches with one seed (latency-model cost: τ and answer shapes only) choose the same configuration."""
    from dream_export.core.prompts import read_prompts
    from dream_export.targets.search import search

    rows = read_prompts(_prompts(tmp_path, 3))
    kw = dict(seed=3, first_rung=1, max_prompts=3, max_new_tokens=10, progress=False, log=lambda _s: None)
    a, b = search(supernet_bundle, "jetson-orin-nano-8gb", rows, **kw), search(supernet_bundle, "jetson-orin-nano-8gb", rows, **kw)
    assert a["chosen"]["config"] == b["chosen"]["config"]
    assert [r["label"] for r in a["front"]] == [r["label"] for r in b["front"]]


def test_search_of_two_targets_compares_their_choices(tmp_path, supernet_bundle):
    """Two modelled targets costed as a VLM that loads on both: one set of answers, a report per target with
    where the chosen request's time goes, and the side-by-side table of the calls that decide (the draft's
    prompt pass, the verify, the draft step) with the term that bounds each; nothing written into the
    bundle. A forecast a target cannot load is refused before any answer is computed."""
    from dream_export.cli import cli
    from dream_export.errors import UsageError

    root = Path(__file__).resolve().parents[1] / "docs" / "cost-as"
    data, out = _prompts(tmp_path), tmp_path / "search.json"
    before = (supernet_bundle / "manifest.json").read_text()
    res = CliRunner().invoke(cli, ["search", str(supernet_bundle), "--target", "jetson-orin-nano-8gb", "--target", "h100",
                                   "--cost-as", str(root / "llava-interleave-qwen-0.5b.json"), "--data", str(data),
                                   "--json", str(out), "--first-rung", "1", "--max-prompts", "2",
                                   "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    assert (supernet_bundle / "manifest.json").read_text() == before
    reps = {t: json.loads((tmp_path / f"search-{t}.json").read_text()) for t in ("jetson-orin-nano-8gb", "h100")}
    for rep in reps.values():
        split = rep["chosen"]["split"]
        assert set(split) == {"vision + prefill", "draft prompt", "decode"} and min(split.values()) > 0
    pass_row = next(k for k in reps["h100"]["bounds"] if k.startswith("draft prompt pass") and k.endswith("keep 1)"))
    assert reps["jetson-orin-nano-8gb"]["bounds"][pass_row]["bound"] == "compute"
    assert reps["h100"]["bounds"]["target decode (1 tok)"]["bound"] == "overhead"
    assert reps["jetson-orin-nano-8gb"]["bounds"]["target decode (1 tok)"]["bound"] == "memory"
    assert "choices per target" in res.output and pass_row in res.output.split("choices per target")[1]
    res = CliRunner().invoke(cli, ["search", str(supernet_bundle), "--target", "h100", "--target", "jetson-orin-nano-8gb",
                                   "--cost-as", str(root / "llava-1.5-7b.json"), "--data", str(data)])
    assert isinstance(res.exception, UsageError), res.output
    assert "llava-1.5-7b" in str(res.exception) and "GiB on jetson-orin-nano-8gb" in str(res.exception)
    assert "Pareto front" not in res.output


def test_subnet_option_parsing(demo_draft):
    spec = _spec(demo_draft)
    assert parse_subnet("heads=0.5,keep=0.75,layer=21", spec) == SubNet(2, 0.75, 21)
    assert parse_subnet("heads=3", spec) == SubNet(3, 1.0, 24)
    assert parse_subnet("heads=4,vtc_keep=1,layer=23,tree=1,5,6", spec) == SubNet(4, 1.0, 23, "1,5,6")
    assert parse_subnet("tree=4, 6, 32,heads=2", spec) == SubNet(2, 1.0, 24, "4,6,32")
    sub = SubNet(2, 0.5, 22, "8,8,64")
    assert parse_subnet(sub.as_option(), spec) == sub and sub.mode == "tree"
    from dream_export.errors import UsageError

    with pytest.raises(UsageError, match="K,DEPTH,TOTAL"):
        parse_subnet("heads=2,tree=1,5", spec)

    with pytest.raises(UsageError, match="not injectable"):
        parse_subnet("layer=3", spec)
    with pytest.raises(UsageError, match="expected heads"):
        parse_subnet("colour=red", spec)


def test_train_supernet_few_steps(tmp_path, demo_target):
    """Phase 2 from the shipped full draft on features carrying the last layers: a ranked, loadable supernet."""
    from dream_export.demo import scenes
    from dream_export.draft.data import DataConfig, generate_features, target_identity
    from dream_export.draft.supernet import SupernetTrainConfig, train_supernet
    from dream_export.draft.target import load_target
    from dream_export.draft.train import DraftTrainConfig, load_draft

    layers = last_layers(24)
    target = load_target(DEMO / "vlm", taps=tuple(layers[:-1]))
    rows = []
    for i, (sc, s) in enumerate(scenes.heldout(3)):
        p = tmp_path / f"img{i}.png"
        scenes.render(sc).save(p)
        rows.append({"image": str(p), "prompt": s.prompt})
    feats = tmp_path / "features"
    generate_features(target.model, target.processor, rows, feats, DataConfig(max_new_tokens=8, taps=tuple(layers[:-1])),
                      target_identity(DEMO / "vlm"), progress=False)
    dec = target.side.decoder
    out = tmp_path / "supernet"
    tcfg = DraftTrainConfig(batch_size=2, lr=1e-4, warmup=1, threads=1)
    _, spec = train_supernet(feats, target.model.lm_head.weight, dec.lm.norm, dec.n_layers, None, tcfg,
                             SupernetTrainConfig(phase2_steps=3, importance_batches=1), init=DEMO / "draft",
                             out_dir=out, log=lambda _s: None, progress=False)
    assert sorted(spec.head_order) == [0, 1, 2, 3] and spec.layers == layers
    assert SupernetSpec.load(out) == spec and spec.training["phase2_steps"] == 3
    assert load_draft(out).config.last_block_heads is None
