"""The search's drafting-shape axis: which shapes it tries, and how the latency model costs them per target
(a verify over N nodes stays at one node's cost while it is bandwidth-bound, and grows once it is
compute-bound: past the target's ridge of FLOP/s over bytes/s)."""

import json
from pathlib import Path

import pytest

from dream_export.errors import UsageError
from dream_export.runtime.tree import TreeSpec
from dream_export.targets.latency import Call, Capacities, LatencyModel
from dream_export.targets.memory import describe_model
from dream_export.targets.registry import get_target
from dream_export.targets.search import ModelledCost, search_shapes
from tests.test_targets_memory import LLAVA_15_7B

# a VLM that loads on an Orin Nano 8GB, as the search's --cost-as reads it (docs/cost-as/)
INTERLEAVE_05B = json.loads((Path(__file__).resolve().parents[1] / "docs" / "cost-as"
                             / "llava-interleave-qwen-0.5b.json").read_text())

# what ModelledCost reads from a supernet bundle's manifest (the costed model comes from cost_as)
MANIFEST = {"supernet": {"head_choices": [1, 2, 3, 4], "num_heads": 4}, "tokens": {"image_tokens_per_image": 10},
            "kv_capacity": 384, "draft_capacity": 576, "cross_capacity": 576, "max_tree": 192}


def test_shapes_fit_the_bundle_and_start_with_its_chain():
    shapes = search_shapes({"max_tree": 32}, "1,5,6")
    assert shapes[0] == "1,5,6" and len(shapes) == len(set(shapes))
    assert "4,6,32" in shapes and all(TreeSpec.parse(s).total <= 32 for s in shapes)
    assert search_shapes({"max_tree": 32}, "1,5,6", ["1,3,9", "4,6,32"]) == ["1,5,6", "1,3,4", "4,6,32"]
    assert search_shapes({"max_tree": 32}, "1,5,6", []) == ["1,5,6"]
    with pytest.raises(UsageError, match="max_tree 32"):
        search_shapes({"max_tree": 32}, "1,5,6", ["8,8,64"])
    with pytest.raises(UsageError, match="K,DEPTH,TOTAL"):
        search_shapes({"max_tree": 32}, "1,5,6", ["4,6"])


def _verify(target: str, precision: str, nodes: int):
    lm = LatencyModel(describe_model(LLAVA_15_7B), Capacities.from_plan(2048, 192), precision)
    return lm.predict(Call("verify", "target", nodes, nodes, context=700), get_target(target))


def test_verify_cost_follows_the_roofline_of_each_target():
    """LLaVA-1.5-7B: Orin Nano (int8: 20.5 TOPS over 68 GB/s, ridge ~150 tokens at 1 byte a weight)
    turns compute-bound between 128 and 192 verified nodes; H100 (1979 TOPS over 3.35 TB/s, ridge ~295
    tokens) stays bandwidth-bound, so 192 nodes cost what one does."""
    orin = {n: _verify("jetson-orin-nano-8gb", "int8", n) for n in (1, 32, 128, 192)}
    assert [orin[n].bound for n in (1, 32, 128)] == ["memory"] * 3 and orin[192].bound == "compute"
    assert orin[128].seconds < 1.02 * orin[1].seconds
    assert orin[192].seconds > 1.15 * orin[128].seconds
    for precision in ("int8", "fp16"):
        h100 = {n: _verify("h100", precision, n) for n in (1, 192)}
        assert h100[192].bound == "memory" and h100[192].seconds < 1.01 * h100[1].seconds


def test_a_forecast_that_cannot_load_on_the_target_is_refused():
    """LLaVA-1.5-7B does not fit an Orin Nano 8GB even at int8 (the memory planner's numbers): no forecast."""
    with pytest.raises(UsageError, match=r"needs .* GiB on jetson-orin-nano-8gb.*dream-export plan"):
        ModelledCost(MANIFEST, ".", get_target("jetson-orin-nano-8gb"), "int8", cost_as=LLAVA_15_7B)
    ModelledCost(MANIFEST, ".", get_target("jetson-agx-orin-64gb"), "int8", cost_as=LLAVA_15_7B)


def test_modelled_round_cost_per_shape():
    """The search's cost of a round: verify over the shape's nodes + context pass + (depth − 1) draft steps.
    A wider tree of the same depth costs one verify more only where that verify is compute-bound."""
    def rounds(target: str, precision: str) -> dict:
        cost = ModelledCost(MANIFEST, ".", get_target(target), precision, cost_as=INTERLEAVE_05B)
        return {s: cost.breakdown(4, TreeSpec.parse(s), 760, 760, 60, 10)["round"]
                for s in ("1,3,4", "1,5,6", "8,10,128", "10,10,192")}

    orin, h100 = rounds("jetson-orin-nano-8gb", "fp16"), rounds("h100", "fp16")
    for r in (orin, h100):  # deeper chains pay draft steps on both
        assert r["1,3,4"] < r["1,5,6"] < r["8,10,128"]
    assert orin["10,10,192"] > 1.05 * orin["8,10,128"]
    assert h100["10,10,192"] < 1.01 * h100["8,10,128"]


def test_visual_compression_pays_where_compute_is_scarce():
    """LLaVA-Interleave-0.5B (729 image tokens), fp16. On Orin Nano every decoding call is bandwidth-bound
    and the draft's prompt pass over the image tokens compute-bound (10 TFLOPS against 68 GB/s); on H100
    the decoding calls are launch-bound and the prompt pass a fraction of one. Cutting the pass's tokens
    (visual keep 0.5) so pays for over four times the τ loss on Orin Nano: a keep-0.5 draft that loses 2%
    of τ is the faster there and the slower on H100."""
    text, img, tokens, rounds = 30, 729, 60, 6.0  # τ 10 with the full draft
    shape = TreeSpec.parse("8,10,128")
    prompt = text + img

    def request(cost, draft_prompt: int, n_rounds: float) -> float:
        b = cost.breakdown(4, shape, prompt, draft_prompt, tokens, round(n_rounds))
        return b["fixed"] + b["draft_prompt"] + n_rounds * b["round"]

    verdict, break_even, bound = {}, {}, {}
    for target in ("jetson-orin-nano-8gb", "h100"):
        cost = ModelledCost(MANIFEST, ".", get_target(target), "fp16", cost_as=INTERLEAVE_05B)
        assert cost.scaled_image_tokens == img
        bounds = cost.bounds(["8,10,128"], prompt, (1.0, 0.5))
        assert bounds[f"draft prompt pass ({prompt} tok, keep 1)"]["bound"] == "compute"
        bound[target] = {bounds["target verify (128 tok)"]["bound"], bounds["draft step (8 tok) h4"]["bound"]}
        verdict[target] = request(cost, text + img // 2, rounds / 0.98) < request(cost, prompt, rounds)
        b = cost.breakdown(4, shape, prompt, prompt, tokens, round(rounds))
        saving = b["draft_prompt"] - cost.breakdown(4, shape, prompt, text + img // 2, tokens, round(rounds))["draft_prompt"]
        break_even[target] = saving / (rounds * b["round"])  # the share of decode time it pays for
    assert bound == {"jetson-orin-nano-8gb": {"memory"}, "h100": {"overhead"}}
    assert verdict == {"jetson-orin-nano-8gb": True, "h100": False}
    assert break_even["jetson-orin-nano-8gb"] > 4 * break_even["h100"]
