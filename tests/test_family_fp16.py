"""FP16 variants of a tiled (LLaVA-NeXT) and a variable-size (Pixtral) family bundle: every graph within
the fp16 tolerance of its torch module, and greedy answers through the runtime equal to fp32's except
where fp32's own top two logits are a near-tie (random-weight tiny models have many)."""

from __future__ import annotations

import shutil

import pytest

from dream_export.export.fp16 import convert_bundle
from dream_export.export.parity import GREEDY_TIE, TOLERANCE, check_bundle

try:
    from tests.bundle_fixture import cached_tiny_bundle
    from tests.test_family_build_plans import KV_CAPACITY
    from tests.tiny_vlms import tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from bundle_fixture import cached_tiny_bundle
    from test_family_build_plans import KV_CAPACITY
    from tiny_vlms import tiny_image

SIZES = [(40, 30), (64, 64), (33, 57), (90, 45), (48, 120), (31, 31)]


@pytest.mark.parametrize("family", ["llava_next", "mistral3"])
def test_fp16_parity_and_greedy_agreement(family, tmp_path_factory):
    src = cached_tiny_bundle(tmp_path_factory.mktemp("plans"), family, KV_CAPACITY[family])
    # a private copy of the bundle with its source checkpoints beside it (paths are relative)
    pair = tmp_path_factory.mktemp(f"fp16-{family}") / "pair"
    shutil.copytree(src.parent, pair, ignore=shutil.ignore_patterns("engines", "verify"))
    convert_bundle(pair / "bundle", log=lambda *_: None)
    samples = [(tiny_image(w, h, seed=i), "Describe the picture.") for i, (w, h) in enumerate(SIZES)]
    report = check_bundle(pair / "bundle", variants=("fp32", "fp16"), seeds=(0,), log=lambda *_: None,
                          samples=samples)
    assert report["ok"], report["failures"]
    for graph, variants in report["graphs"].items():
        worst = max(variants["fp16"]["max_rel"].values())
        assert worst <= TOLERANCE["fp16"], (graph, worst)
    greedy = report["greedy"]["fp16"]
    assert greedy["prompts"] == len(SIZES)
    # every answer that differs from fp32's first does so where fp32's top-2 logits are within GREEDY_TIE
    assert greedy["ok"] and all(greedy["ties"]), greedy
    assert greedy["tie_gap"] == GREEDY_TIE
