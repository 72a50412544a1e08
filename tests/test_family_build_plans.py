"""TensorRT build plans for the families whose vision graph is dynamic (tiles per image, image size, patch
grid): `dream-export build` plans every engine of a tiny bundle of the real HF classes for a Jetson
(TensorRT 8.5 and 10.3) and an H100, and the plan check finds every trtexec option in that release's
parser and every vision call the runtime makes, for images from tiny to the largest the processor
keeps, inside an optimization profile."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from dream_export.cli import cli
from dream_export.targets.bundle_builds import graph_profiles, vision_symbols
from dream_export.targets.coverage import check_plan, probe_image_sizes, record_calls

try:
    from tests.bundle_fixture import cached_tiny_bundle
    from tests.tiny_vlms import tiny_image
except ImportError:  # pytest run without the repository root on sys.path (tests/ is then on it)
    from bundle_fixture import cached_tiny_bundle
    from tiny_vlms import tiny_image

# KV capacity per family: room for the largest image's tokens and a capacity-filling prompt
KV_CAPACITY = {"llava_next": 256, "idefics3": 160, "mistral3": 160, "qwen2_5_vl": 192}
# The tiny checkpoints' (tests/tiny_vlms.py) vision profiles (min, opt, max), from their processor configs:
# LLaVA-NeXT pinpoints 32x64, 64x32, 64x64 of 32 px tiles: base view + 2 .. 4 tiles (a 640x480 photo: 64x64);
# Idefics3 longest edge 64 in 32 px crops: 1x2 .. 2x2 crops + the global view;
# Pixtral longest edge 64, 16 px (patch x merge) steps: 16 .. 64 px a side (640x480 -> 48x64);
# Qwen2.5-VL 32² .. 96² pixels in 16 px merged units: 2x2 .. 6x6 units (640x480 -> 5x6).
PROFILES = {"llava_next": ({"views": 3}, {"views": 5}, {"views": 5}),
            "idefics3": ({"views": 3}, {"views": 5}, {"views": 5}),
            "mistral3": ({"height": 16, "width": 16}, {"height": 48, "width": 64}, {"height": 64, "width": 64}),
            "qwen2_5_vl": ({"units": 4, "patches": 16}, {"units": 30, "patches": 120},
                           {"units": 36, "patches": 144})}
# (width, height) of the images replayed: tiny, elongated both ways, a typical photo, the processor's
# largest (64 px a side for these processors) and larger ones it shrinks
IMAGE_SIZES = [(12, 12), (70, 20), (20, 90), (640, 480), (64, 64), (200, 150), (1000, 1000)]
FAMILIES = sorted(KV_CAPACITY)


@pytest.fixture(scope="module", params=FAMILIES)
def family_bundle(request, tmp_path_factory):
    family = request.param
    return family, cached_tiny_bundle(tmp_path_factory.mktemp("plans"), family, KV_CAPACITY[family])


def _manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _vision_input(manifest: dict) -> str:
    return manifest["graphs"]["vision"]["inputs"][0]["name"]


def test_vision_profile_is_sized_from_the_processor_limits(family_bundle):
    family, bundle = family_bundle
    manifest = _manifest(bundle)
    assert vision_symbols(manifest) == PROFILES[family]
    (profile,) = graph_profiles(manifest)["vision"]
    lo, opt, hi = profile[_vision_input(manifest)]
    assert lo <= opt <= hi and lo != hi  # a dynamic range, not one shape


def test_vision_calls_of_images_of_every_size_fit_the_profile(family_bundle):
    """Seven images, tiny to twice the largest the processor keeps: every vision call fits the plan's
    profile, and the smallest and the largest calls reach its min and max (the profile is no wider than
    the processor needs)."""
    family, bundle = family_bundle
    manifest = _manifest(bundle)
    images = [np.asarray(tiny_image(w, h, seed=i)) for i, (w, h) in enumerate(IMAGE_SIZES)]
    calls = record_calls(bundle, prompts=["What is in the picture?"], requests=[{"mode": "tree", "tree": "4,4,16"}],
                         max_new_tokens=4, images=images)
    vision = [c for c in calls if c.graph == "vision"]
    assert len(vision) >= 1 + 2 * len(images) - 2  # the prompt's image, each image's short and long prompt
    profiles = graph_profiles(manifest)
    result = check_plan(manifest, profiles, calls)
    assert result["uncovered"] == 0, result["examples"]
    name = _vision_input(manifest)
    lo, _, hi = profiles["vision"][0][name]
    shapes = Counter(c.shapes[name] for c in vision)
    assert tuple(lo) in shapes and tuple(hi) in shapes, (lo, hi, shapes)


def test_default_replay_probes_the_vision_range(family_bundle):
    """Without images given, the coverage replay adds images of the processor's range (at least five)."""
    _, bundle = family_bundle
    manifest = _manifest(bundle)
    sizes = probe_image_sizes(manifest)
    assert len(sizes) >= 5
    calls = record_calls(bundle, prompts=["Why?"], requests=[{"mode": "ar"}], max_new_tokens=2)
    name = _vision_input(manifest)
    _, _, hi = graph_profiles(manifest)["vision"][0][name]
    shapes = {c.shapes[name] for c in calls if c.graph == "vision"}
    assert tuple(hi) in shapes and len(shapes) >= 2


@pytest.mark.parametrize("target", [("jetson-orin-nano-8gb", "5.1"), ("jetson-orin-nano-8gb", None), ("h100", None)],
                         ids=["orin-nano-trt8.5", "orin-nano-trt10.3", "h100"])
def test_build_plan_passes_its_check(family_bundle, target):
    """`dream-export build` writes build.sh for the device; its plan check finds every trtexec option in
    the device release's parser, every file it reads in the bundle and every recorded runtime call (real
    requests over prompts up to the KV capacity, and images up to the processor's largest) in a profile."""
    family, bundle = family_bundle
    name, jetpack = target
    args = ["build", str(bundle), "--target", name] + (["--jetpack", jetpack] if jetpack else [])
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = bundle / "engines" / name
    check = json.loads((out / "plan_check.json").read_text())
    assert check["unknown_options"] == 0, check["unknown"]
    assert check["missing_files"] == 0, check["missing"]
    assert check["uncovered"] == 0, check["coverage"]["examples"]
    assert check["coverage"]["by_graph"]["vision"]["calls"] >= 5
    # the vision engine's shapes are the processor's range
    manifest = _manifest(bundle)
    vin = _vision_input(manifest)
    lo, opt, hi = graph_profiles(manifest)["vision"][0][vin]
    script = (out / "build.sh").read_text()
    for flag, shape in (("minShapes", lo), ("optShapes", opt), ("maxShapes", hi)):
        assert f"--{flag}={vin}:{'x'.join(map(str, shape))}" in script, (flag, shape)



@pytest.mark.parametrize("family", ["idefics3", "mistral3"])
def test_a_processor_without_a_size_limit_is_refused_clearly(family, tmp_path_factory):
    """A processor that does not resize (do_resize false) bounds no image size: the plan says so."""
    from dream_export.errors import UsageError

    manifest = _manifest(cached_tiny_bundle(tmp_path_factory.mktemp("plans"), family, KV_CAPACITY[family]))
    manifest["preprocess"]["do_resize"] = False
    with pytest.raises(UsageError, match="do_resize"):
        graph_profiles(manifest)
