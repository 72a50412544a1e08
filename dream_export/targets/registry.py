"""Hardware targets: what each device has, which software stack it runs, and where the numbers come from.

A `Target` is plain data. The memory planner reads capacity and headroom from it, the build-plan
writer reads the SM, the expected TensorRT version and the DLA count, and reports read bandwidth and
peak throughput to put measured speeds in context.

Conventions (so numbers from different datasheets compare):
- `memory_gb` is the module's nominal capacity in GiB (a "64GB" Jetson module has 64 GiB of LPDDR5).
- `bandwidth_gbs` is the datasheet peak in GB/s (decimal), as NVIDIA quotes it.
- `fp16_tflops` / `int8_tops` are *dense* tensor-core peaks of the GPU alone (no DLA, no 2:4 sparsity).
  NVIDIA's Jetson and Ada datasheets quote sparse numbers; dense = sparse / 2. Where a datasheet gives
  only a module total (GPU + DLA), the GPU share is derived from tensor-core count × clock and says so
  in `sources`.
- `os_reserve_gb` is headroom left to the OS, CUDA/TensorRT libraries and carveouts on unified-memory
  devices, where CPU and GPU draw from the same pool. These are estimates for a headless JetPack install.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from dream_export.errors import UsageError

Kind = Literal["jetson", "datacenter", "cpu"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "fp8")

# JetPack release -> (TensorRT major.minor, CUDA major.minor) it ships. 6.1/6.2 are confirmed by the
# Torch-TensorRT JetPack page; 7.0 by the JetPack 7.0 notes + TensorRT 10.13.2 (first with CUDA 13.0);
# 5.1 and 6.0 are the well-known stacks (TensorRT 8.5.2 / 8.6.2) but were not found in the doc search.
JETPACK_STACKS: dict[str, tuple[str, str]] = {
    "5.1": ("8.5", "11.4"),
    "6.0": ("8.6", "12.2"),
    "6.1": ("10.3", "12.6"),
    "6.2": ("10.3", "12.6"),
    "7.0": ("10.13", "13.0"),
}

_SRC_JP6 = ("Torch-TensorRT 'Torch-TensorRT in JetPack' (JetPack 6.1 and 6.2: CUDA 12.6, TensorRT 10.3, "
            "cuDNN 9.3)")
_SRC_JP5 = "JetPack 5.1.x stack (TensorRT 8.5, CUDA 11.4): from the brief, not confirmed by a search here"
_SRC_ORIN = ("Jetson AGX Orin Series Technical Brief (GPU: 2048 CUDA cores, 64 tensor cores, 170 sparse INT8 "
             "TOPS; DLA 2.0 105 sparse TOPS), as quoted by NVIDIA/Deep-Learning-Accelerator-SW README "
             "(GPU 171 sparse INT8 TOPS + 2x DLA 105 at MAXN)")
_SRC_DLA = ("TensorRT 'Working with DLA' (11.4.1): Orin has DLA, 'NVIDIA Jetson Thor, which has no DLA'; "
            "Orin Nano has its DLAs fused off")
_SRC_THOR = ("JetPack 7.0 Downloads and Notes (Jetson Linux 38.2, Jetson AGX Thor); CUDA 13.0 math-library "
             "release notes (nvCOMPDx, cuRANDDx): 'Thor SM renaming from sm_101 to sm_110 starting from "
             "CUDA 13.0'; TensorRT 10.13.2 release: 'Added support for CUDA 13.0'; NVIDIA Thor page: 2070 "
             "FP4 TFLOPS (sparse), 128 GB, 273 GB/s. Dense FP16/INT8 derived as FP4-sparse / 8 and / 4")


@dataclass(frozen=True)
class Target:
    """One deployment device: capacity, software stack and peak rates, with the sources of each fact."""

    name: str
    display_name: str
    kind: Kind
    sm: str | None  # CUDA compute capability "major.minor"; None for the CPU target
    memory_gb: float  # GiB, device memory (unified on Jetson)
    bandwidth_gbs: float | None  # datasheet peak, GB/s
    dla_cores: int
    precisions: tuple[str, ...]
    unified_memory: bool
    os_reserve_gb: float  # GiB kept free for the OS and libraries on unified-memory devices
    default_workspace_mb: int  # TensorRT workspace pool (--memPoolSize=workspace:NM)
    fp16_tflops: float | None  # dense tensor-core peak, GPU only
    int8_tops: float | None  # dense tensor-core peak, GPU only
    jetpack: str | None = None
    tensorrt: str | None = None  # "major.minor" the device's stack ships (datacenter: the minimum we build for)
    cuda: str | None = None
    sources: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown:
            raise ValueError(f"{self.name}: unknown precisions {sorted(unknown)}")
        # FP8 tensor cores arrived with Ada (SM 8.9) and Hopper (9.0): a registry entry claiming FP8 on
        # an older SM is a data error, caught when the module is imported.
        if "fp8" in self.precisions and (self.sm is None or _sm_tuple(self.sm) < (8, 9)):
            raise ValueError(f"{self.name}: FP8 needs SM 8.9 or newer, this target is SM {self.sm}")

    # ------------------------------------------------------------------ derived facts

    @property
    def usable_memory_gb(self) -> float:
        """Memory a model may use: capacity minus the OS reserve on unified-memory devices."""
        return self.memory_gb - self.os_reserve_gb if self.unified_memory else self.memory_gb

    @property
    def usable_memory_bytes(self) -> int:
        """`usable_memory_gb` in bytes."""
        return int(self.usable_memory_gb * 2**30)

    @property
    def trt_version(self) -> tuple[int, int] | None:
        """(major, minor) of the TensorRT this target runs, or None (CPU)."""
        if not self.tensorrt:
            return None
        major, minor = self.tensorrt.split(".")[:2]
        return int(major), int(minor)

    def supports(self, precision: str) -> bool:
        """Whether engines (or, on CPU, ONNX Runtime sessions) can run in `precision` here."""
        return precision in self.precisions

    def check_precision(self, precision: str) -> None:
        """Raise `UsageError` naming what this target supports when `precision` is not among them."""
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not self.supports(precision):
            why = " (FP8 needs SM 8.9+: Ada, Hopper, Blackwell)" if precision == "fp8" else ""
            raise UsageError(f"{self.name} does not support {precision}{why}; "
                             f"it supports {', '.join(self.precisions)}")

    @property
    def jetpacks(self) -> tuple[str, ...]:
        """The JetPack releases this Jetson runs (empty for other devices)."""
        return _JETPACKS_BY_FAMILY[_family(self.name)] if self.kind == "jetson" else ()

    def with_jetpack(self, jetpack: str) -> Target:
        """The same device on another JetPack release: TensorRT and CUDA versions follow the release."""
        if self.kind != "jetson":
            raise UsageError(f"{self.name} is not a Jetson; JetPack does not apply")
        allowed = self.jetpacks
        if jetpack not in allowed:
            raise UsageError(f"{self.name} does not run JetPack {jetpack}; supported: {', '.join(allowed)}")
        trt, cuda = JETPACK_STACKS[jetpack]
        return dataclasses.replace(self, jetpack=jetpack, tensorrt=trt, cuda=cuda)

    def to_dict(self) -> dict:
        """JSON-able form (build.json, reports)."""
        d = dataclasses.asdict(self)
        d["precisions"] = list(self.precisions)
        d["usable_memory_gb"] = round(self.usable_memory_gb, 3)
        return d


def _sm_tuple(sm: str) -> tuple[int, int]:
    major, minor = sm.split(".")
    return int(major), int(minor)


def _family(name: str) -> str:
    if name == "jetson-thor":
        return "thor"
    if "xavier" in name:
        return "xavier"
    if "nano-super" in name:
        return "orin-nano-super"
    return "orin"


# Which JetPack releases each family runs: Xavier stops at JetPack 5.1.x; the Orin Nano "Super" mode
# needs JetPack 6.1+; Thor starts at JetPack 7.
_JETPACKS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "orin": ("5.1", "6.0", "6.1", "6.2"),
    "orin-nano-super": ("6.1", "6.2"),
    "xavier": ("5.1",),
    "thor": ("7.0",),
}


def _jetson(name: str, display: str, *, sm: str, mem: float, bw: float, dla: int, reserve: float,
            workspace: int, fp16: float, int8: float, jetpack: str, sources: str,
            precisions: tuple[str, ...] = ("fp32", "fp16", "int8")) -> Target:
    trt, cuda = JETPACK_STACKS[jetpack]
    return Target(name, display, "jetson", sm, mem, bw, dla, precisions, True, reserve, workspace,
                  fp16, int8, jetpack, trt, cuda, sources)


def _gpu(name: str, display: str, *, sm: str, mem: float, bw: float, fp16: float, int8: float,
         sources: str, workspace: int = 8192) -> Target:
    precisions = ("fp32", "fp16", "int8") + (("fp8",) if _sm_tuple(sm) >= (8, 9) else ())
    # Datacenter stacks are the user's choice; we generate TensorRT 10 build plans (strongly typed
    # Q/DQ), so 10.0 is the minimum the bundle asks for.
    return Target(name, display, "datacenter", sm, mem, bw, 0, precisions, False, 0.0, workspace,
                  fp16, int8, None, "10.0", "12.x", sources)


_TARGETS: tuple[Target, ...] = (
    # --- Orin (SM 8.7, Ampere GA10B). Default stack: JetPack 6.2 (TensorRT 10.3, CUDA 12.6).
    _jetson("jetson-agx-orin-64gb", "Jetson AGX Orin 64GB", sm="8.7", mem=64, bw=204.8, dla=2, reserve=4.0,
            workspace=4096, fp16=42.5, int8=85.0, jetpack="6.2",
            sources=f"{_SRC_ORIN}; 204.8 GB/s LPDDR5; dense = sparse/2; {_SRC_JP6}; {_SRC_DLA}"),
    _jetson("jetson-agx-orin-32gb", "Jetson AGX Orin 32GB", sm="8.7", mem=32, bw=204.8, dla=2, reserve=3.0,
            workspace=4096, fp16=26.9, int8=53.8, jetpack="6.2",
            sources="Jetson AGX Orin Series Technical Brief (32GB: 1792 CUDA cores, 56 tensor cores, 939 MHz; "
                    "200 sparse TOPS module total); GPU dense derived from tensor cores x clock; "
                    f"{_SRC_JP6}"),
    _jetson("jetson-orin-nx-16gb", "Jetson Orin NX 16GB", sm="8.7", mem=16, bw=102.4, dla=2, reserve=1.5,
            workspace=2048, fp16=15.0, int8=30.1, jetpack="6.2",
            sources="JETSON ORIN NX DATASHEET (up to 100 TOPS module total; 1024 CUDA cores, 32 tensor "
                    "cores, 918 MHz; 2 NVDLA v2); GPU dense derived; " + _SRC_JP6),
    _jetson("jetson-orin-nx-8gb", "Jetson Orin NX 8GB", sm="8.7", mem=8, bw=102.4, dla=1, reserve=1.1,
            workspace=1024, fp16=9.4, int8=18.8, jetpack="6.2",
            sources="JETSON ORIN NX DATASHEET (70 TOPS module total; 768 CUDA cores, 24 tensor cores, "
                    "765 MHz; 1 NVDLA v2); GPU dense derived; " + _SRC_JP6),
    _jetson("jetson-orin-nano-8gb", "Jetson Orin Nano 8GB", sm="8.7", mem=8, bw=68.0, dla=0, reserve=1.1,
            workspace=1024, fp16=10.2, int8=20.5, jetpack="6.2",
            sources="Jetson Orin Nano datasheet (40 sparse INT8 TOPS, 68 GB/s, 1024 CUDA cores at 625 MHz; "
                    "no DLA); " + _SRC_JP6),
    _jetson("jetson-orin-nano-4gb", "Jetson Orin Nano 4GB", sm="8.7", mem=4, bw=34.0, dla=0, reserve=0.9,
            workspace=512, fp16=5.1, int8=10.2, jetpack="6.2",
            sources="Jetson Orin Nano datasheet (4GB: 20 sparse INT8 TOPS, 64-bit LPDDR5 34 GB/s, 512 CUDA "
                    "cores; no DLA); " + _SRC_JP6),
    _jetson("jetson-orin-nano-super-8gb", "Jetson Orin Nano Super 8GB", sm="8.7", mem=8, bw=102.0, dla=0,
            reserve=1.1, workspace=1024, fp16=16.7, int8=33.5, jetpack="6.2",
            sources="Jetson Orin Nano Super Developer Kit datasheet (Dec 2024): 67 sparse INT8 TOPS, 102 GB/s, "
                    "GPU 1020 MHz, enabled by JetPack 6.1+; no DLA; " + _SRC_JP6),
    # --- Xavier (SM 7.2, Volta). Last supported stack: JetPack 5.1.x (TensorRT 8.5, CUDA 11.4).
    _jetson("jetson-agx-xavier", "Jetson AGX Xavier 32GB", sm="7.2", mem=32, bw=136.5, dla=2, reserve=3.0,
            workspace=2048, fp16=11.3, int8=22.6, jetpack="5.1",
            sources="Jetson AGX Xavier datasheet (32 TOPS module total, 512 Volta CUDA cores, 64 tensor cores at "
                    "1377 MHz, 136.5 GB/s, 2 NVDLA v1); GPU dense derived; " + _SRC_JP5),
    _jetson("jetson-xavier-nx", "Jetson Xavier NX 8GB", sm="7.2", mem=8, bw=59.7, dla=2, reserve=1.3,
            workspace=1024, fp16=6.8, int8=13.5, jetpack="5.1",
            sources="Jetson Xavier NX Developer Kit datasheet (21 TOPS module total, 384 CUDA cores, 48 tensor "
                    "cores at 1100 MHz, 59.7 GB/s, 2 NVDLA); GPU dense derived; " + _SRC_JP5),
    # --- Thor (SM 11.0 under CUDA 13, Blackwell). JetPack 7.0: TensorRT 10.13, CUDA 13.0. No DLA.
    _jetson("jetson-thor", "Jetson AGX Thor (T5000) 128GB", sm="11.0", mem=128, bw=273.0, dla=0, reserve=8.0,
            workspace=8192, fp16=258.8, int8=517.5, jetpack="7.0", precisions=("fp32", "fp16", "int8", "fp8"),
            sources=f"{_SRC_THOR}; {_SRC_DLA}"),
    # --- Datacenter GPUs (discrete memory).
    _gpu("a100", "NVIDIA A100 80GB SXM", sm="8.0", mem=80, bw=2039.0, fp16=312.0, int8=624.0,
         sources="NVIDIA A100 datasheet: FP16 tensor 312 TFLOPS dense, INT8 624 TOPS dense, 2039 GB/s (80GB "
                 "SXM); no FP8"),
    _gpu("h100", "NVIDIA H100 80GB SXM", sm="9.0", mem=80, bw=3350.0, fp16=989.4, int8=1978.9,
         sources="NVIDIA H100 datasheet (SXM5): FP16 tensor 989 TFLOPS dense (1979 sparse), FP8/INT8 1979 "
                 "dense, 3.35 TB/s HBM3"),
    _gpu("h200", "NVIDIA H200 141GB SXM", sm="9.0", mem=141, bw=4800.0, fp16=989.4, int8=1978.9,
         sources="NVIDIA H200 datasheet: H100 compute with 141 GB HBM3e at 4.8 TB/s"),
    _gpu("l4", "NVIDIA L4 24GB", sm="8.9", mem=24, bw=300.0, fp16=121.0, int8=242.5, workspace=4096,
         sources="NVIDIA L4 datasheet: FP16 tensor 242 TFLOPS and INT8 485 TOPS with sparsity (dense = /2), "
                 "24 GB GDDR6 at 300 GB/s, SM 8.9 (Ada)"),
    _gpu("l40s", "NVIDIA L40S 48GB", sm="8.9", mem=48, bw=864.0, fp16=362.0, int8=733.0,
         sources="NVIDIA L40S datasheet: FP16 tensor 362 TFLOPS dense (733 sparse), INT8 733 TOPS dense (1466 "
                 "sparse), "
                 "48 GB GDDR6 at 864 GB/s, SM 8.9 (Ada)"),
)

_ALIASES: dict[str, str] = {"jetson-orin": "jetson-agx-orin-64gb"}
_BY_NAME: dict[str, Target] = {t.name: t for t in _TARGETS}


def _cpu_target() -> Target:
    """The build/dev host itself, run with ONNX Runtime: capacity is detected, nothing else is known."""
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # non-POSIX host
        mem_gb = 8.0
    # The OS and the Python process share the pool with the model, like a Jetson: keep 2 GiB back.
    return Target("cpu", "Host CPU (ONNX Runtime)", "cpu", None, round(mem_gb, 2), None, 0,
                  ("fp32", "fp16", "int8"), True, 2.0, 0, None, None,
                  sources="host memory from sysconf(SC_PHYS_PAGES) at run time")


def target_names() -> tuple[str, ...]:
    """All known target names, aliases included."""
    return tuple(_BY_NAME) + ("cpu",) + tuple(_ALIASES)


def get_target(name: str, jetpack: str | None = None) -> Target:
    """Look a target up by name or alias; `jetpack` selects another JetPack release for a Jetson.

    Raises `UsageError` listing the known names when `name` is unknown.
    """
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key == "cpu":
        target = _cpu_target()
    elif key in _BY_NAME:
        target = _BY_NAME[key]
    else:
        raise UsageError(f"unknown target {name!r}; known targets: {', '.join(target_names())}")
    return target.with_jetpack(jetpack) if jetpack is not None else target


def all_targets() -> tuple[Target, ...]:
    """Every registered device (without aliases), the host CPU last."""
    return _TARGETS + (_cpu_target(),)
