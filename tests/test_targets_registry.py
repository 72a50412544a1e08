"""The device registry: names users type, the facts plans depend on, and clear refusals."""

from __future__ import annotations

import pytest

from dream_export.errors import UsageError
from dream_export.targets import JETPACK_STACKS, all_targets, get_target, target_names

BRIEF_TARGETS = (
    "jetson-agx-orin-64gb", "jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "jetson-orin-nx-8gb",
    "jetson-orin-nano-8gb", "jetson-orin-nano-4gb", "jetson-orin-nano-super-8gb", "jetson-agx-xavier",
    "jetson-xavier-nx", "jetson-thor", "a100", "h100", "h200", "l4", "l40s", "cpu",
)


def test_every_documented_target_resolves_and_alias_points_at_agx_orin_64gb():
    for name in BRIEF_TARGETS:
        assert get_target(name).name == name
    assert get_target("jetson-orin") == get_target("jetson-agx-orin-64gb")
    assert get_target("  Jetson-Orin ").name == "jetson-agx-orin-64gb"  # forgiving about case/space


def test_unknown_target_is_a_usage_error_that_lists_the_known_names():
    with pytest.raises(UsageError) as err:
        get_target("jetson-tx2")
    msg = str(err.value)
    assert "jetson-tx2" in msg
    for name in ("jetson-agx-orin-64gb", "h100", "cpu", "jetson-orin"):
        assert name in msg
    assert set(BRIEF_TARGETS) | {"jetson-orin"} <= set(target_names())


def test_architecture_facts_the_build_plan_relies_on():
    orin, nano, xavier, thor = (get_target(n) for n in
                                ("jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "jetson-agx-xavier", "jetson-thor"))
    assert (orin.sm, orin.dla_cores, orin.bandwidth_gbs, orin.unified_memory) == ("8.7", 2, 204.8, True)
    assert (nano.dla_cores, nano.bandwidth_gbs) == (0, 68.0)
    assert get_target("jetson-orin-nano-super-8gb").bandwidth_gbs == pytest.approx(102, abs=1)
    assert xavier.sm == "7.2" and thor.sm == "11.0" and thor.dla_cores == 0
    assert get_target("h100").sm == "9.0" and get_target("a100").sm == "8.0" and get_target("l4").sm == "8.9"
    assert get_target("h200").memory_gb > get_target("h100").memory_gb
    # JetPack stacks: the TensorRT/CUDA pairs each device ships by default
    assert (orin.jetpack, orin.tensorrt, orin.cuda) == ("6.2", "10.3", "12.6")
    assert (xavier.jetpack, xavier.tensorrt, xavier.cuda) == ("5.1", "8.5", "11.4")
    assert (thor.jetpack, thor.tensorrt, thor.cuda) == ("7.0", "10.13", "13.0")
    assert JETPACK_STACKS["6.0"] == ("8.6", "12.2")


def test_fp8_only_where_the_sm_has_fp8_tensor_cores():
    for t in all_targets():
        if t.sm is None:
            assert "fp8" not in t.precisions
            continue
        major, minor = map(int, t.sm.split("."))
        assert ("fp8" in t.precisions) == ((major, minor) >= (8, 9)), t.name
    with pytest.raises(UsageError, match="FP8 needs SM 8.9"):
        get_target("jetson-agx-orin-64gb").check_precision("fp8")
    with pytest.raises(UsageError, match="unknown precision"):
        get_target("h100").check_precision("int4")


def test_usable_memory_keeps_the_os_reserve_on_unified_memory_only():
    nx8 = get_target("jetson-orin-nx-8gb")
    assert nx8.usable_memory_gb == pytest.approx(nx8.memory_gb - nx8.os_reserve_gb)
    assert 6.0 < nx8.usable_memory_gb < 8.0
    l4 = get_target("l4")
    assert not l4.unified_memory and l4.usable_memory_gb == l4.memory_gb == 24


def test_jetpack_override_changes_the_stack_and_rejects_releases_a_device_cannot_run():
    jp5 = get_target("jetson-orin", jetpack="5.1")
    assert (jp5.tensorrt, jp5.cuda, jp5.trt_version) == ("8.5", "11.4", (8, 5))
    with pytest.raises(UsageError, match="does not run JetPack 6.2"):
        get_target("jetson-xavier-nx", jetpack="6.2")
    with pytest.raises(UsageError, match="supported: 6.1, 6.2"):
        get_target("jetson-orin-nano-super-8gb", jetpack="5.1")  # Super mode arrived with JetPack 6.1
    with pytest.raises(UsageError, match="not a Jetson"):
        get_target("h100", jetpack="6.2")


def test_every_target_names_its_sources_and_has_sane_numbers():
    for t in all_targets():
        assert t.sources, t.name
        assert t.memory_gb > 0 and t.usable_memory_gb > 0
        if t.kind != "cpu":
            assert t.int8_tops == pytest.approx(2 * t.fp16_tflops, rel=0.05), t.name  # dense INT8 = 2x FP16
            assert t.default_workspace_mb >= 512
    assert get_target("cpu").to_dict()["usable_memory_gb"] > 0
