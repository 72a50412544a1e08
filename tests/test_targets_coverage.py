"""Contract: every graph call the runtime really makes fits an optimization profile of every build plan.

The calls are recorded from real requests on ONNX Runtime (the graphs the TensorRT backend runs), from
the shortest prompt to one that fills the KV capacity, in every decoding mode. A plan that misses one
would make the TensorRT backend refuse that call on the device. The `bundle` fixture is parametrized,
so another model family joins by adding its bundle to `BUNDLES`.
"""

from __future__ import annotations

import json

import pytest

from dream_export.errors import UsageError
from dream_export.export.sources import source_configs
from dream_export.targets.bundle_builds import bundle_builds, graph_profiles
from dream_export.targets.coverage import check_plan, record_calls, save_verify_feeds
from dream_export.targets.memory import ENGINE_CONTEXTS, DraftDesc, describe_model, estimate
from dream_export.targets.registry import all_targets

try:
    from tests.bundle_fixture import cached_tiny_bundle
    from tests.coverage_fixture import (
        cached_small_demo_bundle,
        cached_small_eagle3_bundle,
        cached_small_selfspec_bundle,
    )
except ImportError:  # pragma: no cover
    from bundle_fixture import cached_tiny_bundle
    from coverage_fixture import (
        cached_small_demo_bundle,
        cached_small_eagle3_bundle,
        cached_small_selfspec_bundle,
    )


def _tmp(request, name):
    return request.getfixturevalue("tmp_path_factory").mktemp(name)


# model families whose bundles the contract runs on: name -> bundle directory (built once per process)
BUNDLES = {"demo": lambda request: cached_small_demo_bundle(_tmp(request, "demo-small")),
           "demo-self-spec": lambda request: cached_small_selfspec_bundle(_tmp(request, "demo-self-spec")),
           "demo-eagle3": lambda request: cached_small_eagle3_bundle(_tmp(request, "demo-eagle3")),
           "tiny-llava": lambda request: cached_tiny_bundle(_tmp(request, "tiny"))}


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def bundle(request):
    return BUNDLES[request.param](request)


@pytest.fixture(scope="module")
def recorded(bundle):
    """(manifest, every call of the default requests over prompts from shortest to capacity-filling)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest, record_calls(bundle)


def _plans(manifest):
    """(target, precision, builds) for every registered TensorRT target, on each JetPack release it runs
    (TensorRT 8.5 / 8.6 / 10.x plans differ), and every precision it supports."""
    for base in all_targets():
        if base.trt_version is None:
            continue
        for target in [base.with_jetpack(jp) for jp in base.jetpacks] or [base]:
            for precision in target.precisions:
                try:
                    yield target, precision, bundle_builds(manifest, target, precision)
                except UsageError:  # a precision the plan refuses for this bundle (e.g. no fp8 graph)
                    continue


def test_recorded_calls_span_the_capacity_and_every_mode(recorded):
    manifest, calls = recorded
    assert len(calls) >= 200
    assert {c.graph for c in calls} == {"vision", "target", "draft"}  # the TensorRT backend's graphs only
    requests = " ".join({c.request for c in calls})
    for mode in ("mode=ar", "mode=chain", "tree=4,6,", "temperature=0.8", "vtc_keep=0.75"):
        assert mode in requests
    prefill = [c.shapes["inputs_embeds"][1] for c in calls if c.graph == "target"]
    assert max(prefill) >= manifest["kv_capacity"] - 4  # a prompt that fills the KV capacity


def test_every_call_fits_a_profile_of_every_plan_and_the_memory_fits(recorded, bundle):
    manifest, calls = recorded
    cfg, draft_cfg = source_configs(manifest, bundle)
    model, draft = describe_model(cfg), DraftDesc.from_config(draft_cfg)
    checked = 0
    for target, precision, builds in _plans(manifest):
        result = check_plan(manifest, builds, calls)
        assert result["calls"] == len(calls)
        assert result["uncovered"] == 0, (target.name, target.jetpack, precision, result["examples"])
        memory = estimate(model, target, precision, manifest["kv_capacity"], manifest["max_tree"], draft)
        assert memory.fits, memory.format()
        checked += 1
    assert checked >= 40


def test_profiles_stay_within_what_the_capacities_imply(recorded):
    manifest, calls = recorded
    cap, tree = manifest["kv_capacity"], manifest["max_tree"]
    dcap, ccap = manifest["draft_capacity"], manifest["cross_capacity"]
    p = graph_profiles(manifest)
    # the memory planner reserves activations once per execution context, one per profile
    assert {c: len(ps) for c, ps in p.items()} == ENGINE_CONTEXTS
    prefill, verify = ({n: mom[2] for n, mom in prof.items()} for prof in p["target"])
    assert prefill["inputs_embeds"][1] == cap - 1 and verify["inputs_embeds"][1] == tree
    assert prefill["attention_mask"][2] == min(32, cap) + cap - 1
    assert verify["attention_mask"][2] == cap + tree
    for prof in p["draft"]:
        hi = {n: mom[2] for n, mom in prof.items()}
        assert hi["embeds"][1] <= min(cap, dcap) and hi["self_mask"][2] <= dcap + hi["embeds"][1]
        if "cross_mask" in hi:  # drafts without cross-attention (EAGLE-style, self-spec) have no cross inputs
            assert hi["cross_mask"][2] <= ccap + hi["new_feats"][1] and hi["new_feats"][1] <= ccap
    # the recorded prefills reach the prefill profile's maximum: the plan is no wider than the runtime needs
    assert max(c.shapes["attention_mask"][2] for c in calls if c.graph == "target"
               and c.shapes["logit_rows"] == (1,)) >= prefill["attention_mask"][2] - 4


def test_a_plan_missing_the_runtime_calls_is_reported(recorded):
    manifest, calls = recorded
    profiles = graph_profiles(manifest)
    # masks only as wide as their maximum (a full cache): every call over fewer used slots is missed
    narrow = {c: [{n: ((*lo[:-1], hi[-1]) if n.endswith("mask") else lo, hi, hi) for n, (lo, _o, hi) in prof.items()}
                  for prof in ps] for c, ps in profiles.items()}
    result = check_plan(manifest, narrow, calls)
    assert result["uncovered"] > 0 and result["examples"][0]["reason"] == "fits no profile"
    no_draft = check_plan(manifest, {"vision": profiles["vision"], "target": profiles["target"]}, calls)
    assert no_draft["uncovered"] == no_draft["by_graph"]["draft"]["calls"] > 0
    assert any(e["reason"] == "the plan builds no engine for it" for e in no_draft["examples"])


def test_verify_feeds_run_in_polygraphy(bundle, tmp_path):
    """The saved feeds load back in polygraphy and run the bundle's graphs (what build.sh compares)."""
    import onnxruntime as ort
    from polygraphy.json import load_json

    from dream_export.runtime.bundle import Bundle

    saved = save_verify_feeds(bundle, tmp_path)
    assert sorted(saved) == ["draft", "target", "vision"]
    b = Bundle.open(bundle)
    for graph, path in saved.items():
        feeds = load_json(path)
        # one per set of profiles a call fits: vision 1; of two profiles {0}, {1} or both
        assert len(feeds) == 1 if graph == "vision" else 2 <= len(feeds) <= 3
        assert path.stat().st_size < 16 * 2**20
        sess = ort.InferenceSession(str(b.graph_path(graph)), providers=["CPUExecutionProvider"])
        for feed in feeds:
            assert set(feed) == {i.name for i in sess.get_inputs()}
            sess.run(None, feed)
