"""Deployment targets: the device registry, memory planning, TensorRT build plans, and profile tables.

Nothing here imports torch or TensorRT: plans are data and shell commands, checked here and executed
on the device by the bundle's `build.sh`.
"""

from dream_export.targets.memory import (
    DraftDesc,
    MemoryItem,
    MemoryPlan,
    ModelDesc,
    TextDesc,
    VisionDesc,
    describe_model,
    estimate,
    plan_memory,
)
from dream_export.targets.profiles import (
    format_table,
    load_profile,
    parse_ort_profile,
    parse_trtexec_layer_info,
    parse_trtexec_profile,
)
from dream_export.targets.registry import JETPACK_STACKS, Target, all_targets, get_target, target_names
from dream_export.targets.trtexec import (
    GraphBuild,
    make_build,
    merge_profiles,
    parse_build_script,
    parse_trtexec_command,
    trtexec_command,
    trtexec_profile_command,
    write_build_bundle,
)

__all__ = [
    "JETPACK_STACKS",
    "DraftDesc",
    "GraphBuild",
    "MemoryItem",
    "MemoryPlan",
    "ModelDesc",
    "Target",
    "TextDesc",
    "VisionDesc",
    "all_targets",
    "describe_model",
    "estimate",
    "format_table",
    "get_target",
    "load_profile",
    "make_build",
    "merge_profiles",
    "parse_build_script",
    "parse_ort_profile",
    "parse_trtexec_command",
    "parse_trtexec_layer_info",
    "parse_trtexec_profile",
    "plan_memory",
    "target_names",
    "trtexec_command",
    "trtexec_profile_command",
    "write_build_bundle",
]
