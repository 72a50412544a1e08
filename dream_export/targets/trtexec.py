"""TensorRT build plans as trtexec commands, and the self-contained `build.sh` that runs them on a device.

When the build host is not the device (a laptop exporting for a Jetson), the bundle carries a
`build.json` (the plan as data) and an executable `build.sh` (the same plan as exact trtexec command
lines). `parse_trtexec_command` reads a command back into a `GraphBuild`, so the two never drift: a
test renders the script and parses every line back to the plan.

Every command is rendered in the dialect of the TensorRT release it is for and checked against that
release's option table (`trt_contract`, generated from trtexec's own `sampleOptions.cpp`) before it is
written; what differs between releases, from those sources:
- optimization profiles: `--profile=N` groups of `--minShapes/--optShapes/--maxShapes` exist from 9.0;
  trtexec 8.5 and 8.6 build exactly one profile. There the plan merges a graph's profiles into one
  (`merge_profiles`) rather than building one engine per profile: each engine carries its own copy of
  the weights (8.x has no weight sharing between engines), so two target engines would double the
  largest allocation on an 8 GB Jetson, while a merged profile costs only tactics tuned for one opt shape.
- a static graph takes no explicit shapes at all: `sampleEngines.cpp` stops with "Static model does not
  take explicit shapes ..." (every release), so such graphs get no shape flags.
- `--stronglyTyped` (9.0+) takes types from a Q/DQ graph and forbids --fp16/--int8; 8.x builds INT8
  implicitly from a calibration cache (`--int8 --calib=FILE`).
- `--skipInference` from 8.6 (`--buildOnly` on 8.5, still accepted until 9.0); `--useProfile` (select the
  inference profile) from 9.0; `--builderOptimizationLevel` from 8.6; `--memPoolSize` sizes take B/K/M/G
  suffixes on 10.x, bare numbers (MiB) on 8.x.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import dream_export.targets.trt_contract as trt_contract
from dream_export.errors import UsageError
from dream_export.io import atomic_write_text
from dream_export.runtime.engine_meta import ENGINE_META_FORMAT
from dream_export.targets.registry import Target, get_target

COMPONENTS: tuple[str, ...] = ("vision", "target", "draft")
BUILD_FORMAT = "dream-export-build/1"

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass
class GraphBuild:
    """How to build one engine: which graph, which shapes, which precision flags, where to put it.

    Paths are relative to the bundle root (build.sh runs from there). `tensorrt` is the
    "major.minor" the command is rendered for; it decides the flag dialect.
    """

    component: str
    onnx: str
    engine: str
    profiles: list[Profile]
    fp16: bool = False
    int8: bool = False
    strongly_typed: bool = False
    calib_cache: str | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    workspace_mb: int | None = None
    timing_cache: str | None = None
    builder_optimization_level: int | None = None
    layer_info: str | None = None  # --profilingVerbosity=detailed --exportLayerInfo=<this>
    tensorrt: str = "10.0"
    static: bool = False  # the graph has no dynamic input dim: trtexec refuses explicit shapes for it

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise UsageError(f"unknown component {self.component!r}; expected one of {', '.join(COMPONENTS)}")
        self.profiles = [{name: tuple(tuple(int(d) for d in s) for s in mom) for name, mom in p.items()}
                         for p in self.profiles]
        for i, p in enumerate(self.profiles):
            for name, mom in p.items():
                _check_range(self.component, i, name, mom)

    @property
    def trt_version(self) -> tuple[int, int]:
        """(major, minor) of `tensorrt`."""
        major, minor = (self.tensorrt.split(".") + ["0"])[:2]
        return int(major), int(minor)

    @property
    def precision(self) -> str:
        """A one-word summary for reports. Builder flags say it, except for strongly typed builds, whose
        types live in the graph: there it is read from the bundle directory name (onnx-int8/, onnx-fp8/)."""
        if self.int8:
            return "int8"
        if self.strongly_typed:
            parts = Path(self.onnx).parts
            return next((p for p in ("int8", "fp8", "fp16") if any(p in part for part in parts[:-1])), "fp32")
        return "fp16" if self.fp16 else "fp32"

    def to_dict(self) -> dict:
        """JSON-able form: shapes as lists, profiles as {name: {min, opt, max}}."""
        d = {k: v for k, v in self.__dict__.items() if k != "profiles"}
        d["profiles"] = [{name: {"min": list(mn), "opt": list(op), "max": list(mx)}
                          for name, (mn, op, mx) in p.items()} for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GraphBuild:
        """Inverse of `to_dict`."""
        d = dict(d)
        profiles = [{name: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for name, s in p.items()}
                    for p in d.pop("profiles")]
        return cls(profiles=profiles, **d)


def _check_range(component: str, index: int, name: str, mom: tuple) -> None:
    if "," in name or "=" in name:
        raise UsageError(f"{component}: input name {name!r} contains ',' or '=', which trtexec cannot parse")
    if len(mom) != 3:
        raise UsageError(f"{component} profile {index} input {name}: need (min, opt, max) shapes")
    mn, op, mx = mom
    if not (len(mn) == len(op) == len(mx)):
        raise UsageError(f"{component} profile {index} input {name}: min/opt/max ranks differ: {mn} {op} {mx}")
    if any(not (a <= b <= c) for a, b, c in zip(mn, op, mx, strict=True)):
        raise UsageError(f"{component} profile {index} input {name}: need min <= opt <= max per dimension, "
                         f"got {mn} {op} {mx}")


# ------------------------------------------------------------------------------------ building plans


def make_build(component: str, precision: str, target: Target | str, profiles: list[Profile], *,
               onnx: str | None = None, engine: str | None = None, calib_cache: str | None = None,
               dla_core: int | None = None, workspace_mb: int | None = None, timing_cache: str | None = None,
               builder_optimization_level: int | None = None, layer_info: bool | str = False) -> GraphBuild:
    """A `GraphBuild` with the precision flags right for `target`'s TensorRT.

    - fp16: `--fp16` on the FP16 graph.
    - int8 where trtexec has `--stronglyTyped` (9.0+): the Q/DQ graph's FP16 twin, types from the graph.
    - int8 on TensorRT 8.x: implicit quantization, `--int8 --fp16 --calib=<cache>` on the fp32 graph the
      cache was measured on (its tensor names are the cache's keys; `--fp16` so layers without an INT8
      scale run in FP16, not FP32).
    - fp8: refused: no command of this project writes FP8 graphs (onnx-fp8/).
    Several profiles for a release whose trtexec builds one (8.5, 8.6) are merged (see the module doc).
    Default paths follow the bundle layout; `plan_files.bind_to_bundle` points them at the files a
    given bundle really holds.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    tgt.check_precision(precision)
    if tgt.trt_version is None:
        raise UsageError(f"{tgt.name} runs ONNX Runtime, not TensorRT: there is nothing to build")
    trt = f"{tgt.trt_version[0]}.{tgt.trt_version[1]}"
    flags: dict = {}
    if precision == "fp32":
        graph_dir = "onnx"
    elif precision == "fp16":
        graph_dir, flags = "onnx-fp16", {"fp16": True}
    elif precision == "int8" and trt_contract.has_option(trt, "--stronglyTyped"):
        # the Q/DQ graph's FP16 twin `calibrate` writes: strongly typed, the unquantized rest runs FP16
        graph_dir, flags = "onnx-int8", {"strongly_typed": True}
        onnx = onnx or f"onnx-int8/{component}.fp16.onnx"
    elif precision == "int8":
        graph_dir = "onnx"
        flags = {"int8": True, "fp16": True, "calib_cache": calib_cache or f"calib/{component}.cache"}
    else:
        raise UsageError("FP8 engines need FP8 Q/DQ graphs (onnx-fp8/), which no dream-export command writes yet; "
                         "build --precision fp16 or int8 (after `dream-export calibrate --precision int8`)")
    if len(profiles) > 1 and not trt_contract.has_option(trt, "--profile"):
        profiles = [merge_profiles(profiles)]
    if dla_core is not None:
        if dla_core >= tgt.dla_cores:
            have = f"DLA cores 0..{tgt.dla_cores - 1}" if tgt.dla_cores else "no DLA"
            raise UsageError(f"{tgt.name} has {have}; cannot use DLA core {dla_core}")
        if precision not in ("fp16", "int8"):
            raise UsageError(f"DLA runs FP16 or INT8 only, not {precision}")
    engine = engine or f"engines/{tgt.name}/{component}.engine"
    info = layer_info if isinstance(layer_info, str) else (_sibling(engine, ".layers.json") if layer_info else None)
    return GraphBuild(component, onnx or f"{graph_dir}/{component}.onnx", engine, profiles, dla_core=dla_core,
                      workspace_mb=workspace_mb if workspace_mb is not None else tgt.default_workspace_mb,
                      timing_cache=timing_cache, builder_optimization_level=builder_optimization_level,
                      layer_info=info, tensorrt=trt, **flags)


def _sibling(path: str, suffix: str) -> str:
    for ext in (".engine", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)] + suffix
    return path + suffix


def merge_profiles(profiles: list[Profile]) -> Profile:
    """One profile spanning several (min of mins, max of maxes, opt of the first).

    For trtexec 8.5/8.6, which builds one profile: the engine then serves every shape, tuned for the
    first profile's opt shape (put the latency-critical one first).
    """
    if not profiles:
        raise UsageError("no profiles to merge")
    names = set(profiles[0])
    if any(set(p) != names for p in profiles):
        raise UsageError("profiles name different inputs; cannot merge")
    merged: Profile = {}
    for name in profiles[0]:
        mins = [p[name][0] for p in profiles]
        maxs = [p[name][2] for p in profiles]
        merged[name] = (tuple(map(min, zip(*mins, strict=True))), profiles[0][name][1],
                        tuple(map(max, zip(*maxs, strict=True))))
    return merged


# ------------------------------------------------------------------------------------ rendering


def _shape_spec(profile: Profile, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in mom[which])}" for name, mom in profile.items())


def trtexec_command(build: GraphBuild) -> list[str]:
    """The exact trtexec argv (without a shell) that builds `build`, in `build.tensorrt`'s dialect."""
    ver = build.trt_version
    has = lambda option: trt_contract.has_option(build.tensorrt, option)  # noqa: E731
    if build.strongly_typed and not has("--stronglyTyped"):
        raise UsageError(f"--stronglyTyped needs TensorRT 9+, this build targets {build.tensorrt}; "
                         f"use implicit INT8 with a calibration cache")
    if build.strongly_typed and (build.fp16 or build.int8):
        raise UsageError("--stronglyTyped takes types from the graph and cannot be combined with --fp16/--int8")
    if build.int8 and ver >= (10, 0) and not build.calib_cache:
        raise UsageError("implicit INT8 without a calibration cache would use random scales; on TensorRT 10 "
                         "build the Q/DQ graph with --stronglyTyped instead")
    if len(build.profiles) > 1 and not has("--profile"):
        raise UsageError(f"{build.component}: {len(build.profiles)} optimization profiles, but trtexec "
                         f"{build.tensorrt} builds one (no --profile in "
                         f"{trt_contract.source_of('trtexec_options', build.tensorrt)}); merge them (merge_profiles)")
    if build.static and len(build.profiles) > 1:
        raise UsageError(f"{build.component}: a static graph has one shape, not {len(build.profiles)} profiles")
    argv = ["trtexec", f"--onnx={build.onnx}", f"--saveEngine={build.engine}"]
    for i, profile in enumerate(build.profiles):
        if not profile or build.static:  # trtexec refuses explicit shapes for a static model
            continue
        if len(build.profiles) > 1:
            argv.append(f"--profile={i}")
        argv += [f"--minShapes={_shape_spec(profile, 0)}", f"--optShapes={_shape_spec(profile, 1)}",
                 f"--maxShapes={_shape_spec(profile, 2)}"]
    if build.strongly_typed:
        argv.append("--stronglyTyped")
    if build.fp16:
        argv.append("--fp16")
    if build.int8:
        argv.append("--int8")
    if build.calib_cache:
        argv.append(f"--calib={build.calib_cache}")
    if build.dla_core is not None:
        argv.append(f"--useDLACore={build.dla_core}")
        if build.gpu_fallback:
            argv.append("--allowGPUFallback")
    if build.workspace_mb is not None:
        unit = "M" if ver >= (10, 0) else ""  # 8.x: bare numbers are MiB
        argv.append(f"--memPoolSize=workspace:{build.workspace_mb}{unit}")
    if build.timing_cache:
        argv.append(f"--timingCacheFile={build.timing_cache}")
    if build.builder_optimization_level is not None:
        if not has("--builderOptimizationLevel"):
            raise UsageError(f"--builderOptimizationLevel needs TensorRT 8.6+, this build targets {build.tensorrt}")
        argv.append(f"--builderOptimizationLevel={build.builder_optimization_level}")
    if build.layer_info:
        argv += ["--profilingVerbosity=detailed", f"--exportLayerInfo={build.layer_info}"]
    argv.append("--skipInference" if has("--skipInference") else "--buildOnly")
    return _checked(argv, build.tensorrt)


def _checked(argv: list[str], tensorrt: str) -> list[str]:
    """`argv` if trtexec `tensorrt` parses it (per its option table), else a `UsageError` with every reason."""
    problems = trt_contract.check_trtexec_argv(argv, tensorrt)
    if problems:
        raise UsageError(f"trtexec {tensorrt} would reject {shlex.join(argv)}: {'; '.join(problems)}")
    return argv


def trtexec_profile_command(build: GraphBuild, shapes: dict[str, Shape], profile_index: int = 0,
                            export_profile: str | None = None, iterations: int = 50) -> list[str]:
    """trtexec argv that runs a built engine at `shapes` and exports per-layer times (`--exportProfile`)
    and the engine's layers (`--exportLayerInfo`, detailed when the engine was built with detailed
    profiling verbosity).

    The inference profile is chosen with `--useProfile` where trtexec has it (9.0+); 8.5/8.6 have no
    such option (plans for them hold one merged profile, so index 0 is the only one). A static engine
    gets no `--shapes`. The JSON it writes is what `dream_export.targets.profiles.parse_trtexec_profile` reads.
    """
    out = export_profile or _sibling(build.engine, f".profile{profile_index}.json")
    argv = ["trtexec", f"--loadEngine={build.engine}"]
    if shapes and not build.static:
        argv.append("--shapes=" + ",".join(f"{n}:{'x'.join(str(d) for d in s)}" for n, s in shapes.items()))
    if trt_contract.has_option(build.tensorrt, "--useProfile"):
        argv.append(f"--useProfile={profile_index}")
    elif profile_index != 0:
        raise UsageError(f"trtexec {build.tensorrt} has no --useProfile: its engines hold one profile, not "
                         f"profile {profile_index}")
    argv += [f"--iterations={iterations}", "--separateProfileRun", "--dumpProfile", f"--exportProfile={out}",
             "--profilingVerbosity=detailed", f"--exportLayerInfo={_sibling(out, '.layers.json')}"]
    if build.dla_core is not None:
        argv.append(f"--useDLACore={build.dla_core}")
    return _checked(argv, build.tensorrt)


# ------------------------------------------------------------------------------------ parsing


def _parse_spec(spec: str) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for item in spec.split(","):
        name, _, dims = item.rpartition(":")  # trtexec splits on the last ':' (names may contain ':')
        if not name:
            raise UsageError(f"bad shape spec {item!r}; expected name:AxBxC")
        out[name.strip("'")] = tuple(int(d) for d in dims.split("x")) if dims and dims != "scalar" else ()
    return out


def parse_trtexec_command(argv: list[str] | str, component: str | None = None,
                          tensorrt: str | None = None) -> GraphBuild:
    """Read a trtexec build command back into a `GraphBuild`.

    `component` defaults to the ONNX file's stem (onnx-fp16/target.onnx -> "target"). `tensorrt`
    defaults to a dialect guess: --stronglyTyped / --profile groups / an 'M' workspace suffix mean 10.x.
    """
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if args and Path(args[0]).name == "trtexec":
        args = args[1:]
    opts: dict = {}
    profiles: list[dict[str, list]] = []
    current: dict[str, list] | None = None
    guess_modern = False
    for arg in args:
        key, eq, value = arg.partition("=")
        if key == "--profile":
            current = {}
            profiles.append(current)
            guess_modern = True
        elif key in ("--minShapes", "--optShapes", "--maxShapes"):
            if current is None:
                current = {}
                profiles.append(current)
            which = ("--minShapes", "--optShapes", "--maxShapes").index(key)
            for name, shape in _parse_spec(value).items():
                current.setdefault(name, [None, None, None])[which] = shape
        elif key == "--onnx":
            opts["onnx"] = value
        elif key == "--saveEngine":
            opts["engine"] = value
        elif key == "--fp16":
            opts["fp16"] = True
        elif key == "--int8":
            opts["int8"] = True
        elif key == "--stronglyTyped":
            opts["strongly_typed"] = True
            guess_modern = True
        elif key == "--calib":
            opts["calib_cache"] = value
        elif key == "--useDLACore":
            opts["dla_core"] = int(value)
            opts.setdefault("gpu_fallback", False)
        elif key == "--allowGPUFallback":
            opts["gpu_fallback"] = True
        elif key == "--memPoolSize":
            for pool in value.split(","):
                name, _, size = pool.partition(":")
                if name == "workspace":
                    opts["workspace_mb"] = _to_mib(size)
                    guess_modern = guess_modern or size[-1:].isalpha()
        elif key == "--timingCacheFile":
            opts["timing_cache"] = value
        elif key == "--builderOptimizationLevel":
            opts["builder_optimization_level"] = int(value)
        elif key == "--exportLayerInfo":
            opts["layer_info"] = value
        elif key in ("--profilingVerbosity", "--skipInference", "--buildOnly"):
            pass  # implied by layer_info / by every build command
        else:
            raise UsageError(f"unsupported trtexec option {arg!r} in a build command")
        if eq and not value and key != "--profile":
            raise UsageError(f"empty value in {arg!r}")
    if "onnx" not in opts or "engine" not in opts:
        raise UsageError("a build command needs --onnx and --saveEngine")
    for i, p in enumerate(profiles):
        for name, mom in p.items():
            if any(s is None for s in mom):
                raise UsageError(f"profile {i} input {name}: need all of --minShapes/--optShapes/--maxShapes")
    comp = component or Path(opts["onnx"]).name.split(".")[0]  # onnx-int8/target.fp16.onnx -> target
    # --buildOnly is the pre-8.6 spelling of --skipInference; everything we render for 8.6+ is 10.x.
    version = tensorrt or ("8.5" if "--buildOnly" in args and not guess_modern else "10.0")
    # plans give every dynamic graph its shapes, so a command without any is a static graph's
    return GraphBuild(comp, profiles=[{n: tuple(m) for n, m in p.items()} for p in profiles],
                      tensorrt=version, static=not profiles, **opts)


def _to_mib(size: str) -> int:
    scale = {"B": 1 / 2**20, "K": 1 / 2**10, "M": 1, "G": 2**10}
    unit = size[-1:].upper()
    if unit in scale:
        return int(float(size[:-1]) * scale[unit])
    return int(float(size))


# ------------------------------------------------------------------------------------ the bundle


def write_build_bundle(out_dir: str | Path, builds: list[GraphBuild], target: Target | str,
                       meta: dict | None = None, root: str = ".",
                       verify: dict[str, list[VerifyStep]] | None = None) -> tuple[Path, Path]:
    """Write `build.json` and an executable `build.sh` into `out_dir` (the bundle root), atomically.

    build.sh checks that `trtexec` exists and that the device matches the plan (Jetson: the TensorRT
    major.minor; other GPUs: the SM from `nvidia-smi --query-gpu=compute_cap`), prints each step, builds
    each engine, and writes `<engine stem>.json` beside each engine as the last step — the commit
    marker a loader requires (with the engine's sha256). A failed build restores the previous engine.
    `FORCE=1 ./build.sh` skips the device checks. `root`: the bundle root relative to `out_dir`
    (the script changes there first, since every path in the plan is relative to the bundle).

    After building, each component with `verify` steps (one per optimization profile its feeds use) is
    compared with ONNX Runtime on its recorded feeds (`polygraphy run`, results in `<out_dir>/verify.json`)
    and timed with a per-layer profile (`trtexec_profile_command` at its first profile's opt shapes).
    `SKIP_VERIFY=1` skips both.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if tgt.trt_version is None:
        raise UsageError(f"{tgt.name} runs ONNX Runtime, not TensorRT: there is nothing to build")
    if not builds:
        raise UsageError("no engines to build")
    expected = f"{tgt.trt_version[0]}.{tgt.trt_version[1]}"
    commands = []
    for b in builds:
        # Paths land in shell words and in the engine-metadata JSON the script writes; keep them plain.
        for path in (b.onnx, b.engine, b.calib_cache, b.timing_cache, b.layer_info):
            if path and (any(c in path for c in '"\\\n$`') or os.path.isabs(path)):
                raise UsageError(f"{b.component}: path {path!r} must be relative to the bundle and plain")
        if b.trt_version[0] != tgt.trt_version[0]:
            raise UsageError(f"{b.component} is rendered for TensorRT {b.tensorrt}, {tgt.name} runs {expected}")
        if b.dla_core is not None and b.dla_core >= tgt.dla_cores:
            raise UsageError(f"{b.component}: {tgt.name} has {tgt.dla_cores} DLA cores, cannot use core {b.dla_core}")
        commands.append(trtexec_command(b))
    verify = verify or {}
    unknown = set(verify) - {b.component for b in builds}
    if unknown:
        raise UsageError(f"verification feeds for components the plan does not build: {sorted(unknown)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"format": BUILD_FORMAT, "target": tgt.name, "display_name": tgt.display_name, "kind": tgt.kind,
            "sm": tgt.sm, "tensorrt_expected": expected, "jetpack": tgt.jetpack, "cuda": tgt.cuda,
            "builds": [b.to_dict() for b in builds], "commands": [shlex.join(c) for c in commands],
            "checks": [shlex.join(c) for b in builds for step in verify.get(b.component, ())
                       for c in check_commands(b, step)],
            "meta": meta or {}}
    json_path, sh_path = out / "build.json", out / "build.sh"
    atomic_write_text(json_path, json.dumps(plan, indent=2) + "\n")
    atomic_write_text(sh_path, _render_script(tgt, expected, builds, commands, root, verify))
    os.chmod(json_path, 0o644)
    os.chmod(sh_path, 0o755)
    return json_path, sh_path


def parse_build_script(text: str) -> list[GraphBuild]:
    """The `GraphBuild`s of a build.sh written by `write_build_bundle` (one per `build_engine` line)."""
    expected = None
    builds = []
    for line in text.splitlines():
        if line.startswith("EXPECTED_TRT="):
            expected = shlex.split(line.partition("=")[2])[0]
        if line.startswith("build_engine "):
            tokens = shlex.split(line)
            component, argv = tokens[1], tokens[tokens.index("trtexec"):]
            builds.append(parse_trtexec_command(argv, component=component, tensorrt=expected))
    return builds


def _render_script(tgt: Target, expected: str, builds: list[GraphBuild], commands: list[list[str]],
                   root: str = ".", verify: dict[str, list[VerifyStep]] | None = None) -> str:
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# Builds the TensorRT engines of this bundle for {tgt.display_name} ({tgt.name}).",
        "# Generated by dream-export; the same plan as data is in build.json. Run from anywhere:",
        "#   ./build.sh            (FORCE=1 ./build.sh skips the device checks)",
        "set -euo pipefail",
        f'cd "$(dirname "$0")/{root}"' if root != "." else 'cd "$(dirname "$0")"',
        "",
        f"TARGET={q(tgt.name)}",
        f"EXPECTED_TRT={q(expected)}",
        f"EXPECTED_SM={q(tgt.sm or '')}",
        f"IS_JETSON={1 if tgt.kind == 'jetson' else 0}",
        "",
        _SCRIPT_BODY.replace("@ENGINE_META_FORMAT@", ENGINE_META_FORMAT),
    ]
    for b, argv in zip(builds, commands, strict=True):
        lines.append(f"build_engine {q(b.component)} {q(b.engine)} {q(b.onnx)} {shlex.join(argv)}")
    lines += ["", 'echo "all engines built for $TARGET (TensorRT $TRT_FOUND)"', ""]
    verify = verify or {}
    if verify:
        lines += ['if [ "${SKIP_VERIFY:-0}" != "1" ]; then',
                  "  command -v polygraphy >/dev/null 2>&1 || die \"polygraphy not found: pip install polygraphy "
                  "(in the venv that sees TensorRT), or SKIP_VERIFY=1\""]
        for b in builds:
            for i, step in enumerate(verify.get(b.component, ())):
                ref, run, timing = check_commands(b, step)
                label = b.component if step.profile is None else f"{b.component}.p{step.profile}"
                lines.append(f"  verify_engine {q(label)} {shlex.join(ref)} ::: {shlex.join(run)}")
                if i == 0:
                    lines.append(f"  time_engine {q(b.component)} {shlex.join(timing)}")
        lines += [f"  write_verify {q(_verify_json(builds[0].engine))}", "fi", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class VerifyStep:
    """How build.sh checks one engine after building it: recorded feeds (polygraphy JSON, relative to the
    bundle), the graph ONNX Runtime runs as the reference, the comparison tolerances, and the optimization
    profile the feeds fit (None: the engine has one; polygraphy otherwise runs profile 0 only)."""

    feeds: str
    reference_onnx: str
    rtol: float = 1e-2
    atol: float = 1e-2
    profile: int | None = None


def verify_step(build: GraphBuild, feeds: str, reference_onnx: str, profile: int | None = None) -> VerifyStep:
    """The check for `build`: FP16 engines within 1e-2, INT8 engines within 1e-1 of the fp32 graph, on the
    median error of each output (a near-tie that swaps one top-k id is not a failure; a broken engine is)."""
    tol = 1e-1 if build.precision == "int8" else 1e-2
    return VerifyStep(feeds, reference_onnx, tol, tol, profile if len(build.profiles) > 1 else None)


def _verify_json(engine: str) -> str:
    return str(Path(engine).parent / "verify.json")


def polygraphy_reference_command(step: VerifyStep, out: str) -> list[str]:
    """`polygraphy run` of the reference graph with ONNX Runtime on the recorded feeds, saving its outputs."""
    return ["polygraphy", "run", step.reference_onnx, "--onnxrt", "--load-inputs", step.feeds, "--save-outputs", out]


def check_commands(build: GraphBuild, step: VerifyStep) -> tuple[list[str], list[str], list[str]]:
    """(reference run, engine comparison, timing run) argv of build.sh's checks for one engine."""
    ref_out = _sibling(build.engine, ".ort.json" if step.profile is None else f".p{step.profile}.ort.json")
    ref = polygraphy_reference_command(step, ref_out)
    run = ["polygraphy", "run", build.engine, "--model-type", "engine", "--trt", "--load-inputs", step.feeds,
           "--load-outputs", ref_out, "--rtol", str(step.rtol), "--atol", str(step.atol),
           "--check-error-stat", "median"]
    if step.profile is not None:  # polygraphy >= 0.38
        run += ["--optimization-profile", str(step.profile)]
    shapes = {name: mom[1] for name, mom in build.profiles[0].items()} if build.profiles else {}
    return ref, run, trtexec_profile_command(build, shapes, 0)


# The shell half. Kept as one literal so it reads as a script; variables above parameterise it.
_SCRIPT_BODY = r'''die() { echo "build.sh: $*" >&2; exit 1; }

command -v trtexec >/dev/null 2>&1 || die "trtexec not found on PATH. On Jetson it is /usr/src/tensorrt/bin/trtexec (apt install tensorrt); add it to PATH and rerun."
command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"

# TensorRT version from trtexec's banner: "[TensorRT v100300]" (10.x: MMmmpp) or "[TensorRT v8502]" (8.x: Mmpp).
TRT_CODE=$(trtexec --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | grep -o '[0-9]*' || true)
if [ -z "$TRT_CODE" ]; then
  TRT_FOUND="unknown"
elif [ "$TRT_CODE" -ge 10000 ]; then
  TRT_FOUND="$((TRT_CODE / 10000)).$(((TRT_CODE / 100) % 100))"
else
  TRT_FOUND="$((TRT_CODE / 1000)).$(((TRT_CODE / 100) % 10))"
fi
echo "target $TARGET: expecting TensorRT $EXPECTED_TRT${EXPECTED_SM:+, SM $EXPECTED_SM}; found TensorRT $TRT_FOUND"

# The SM: nvidia-smi where it reports one (JetPack 6 prints N/A), else the CUDA runtime API (libcudart
# through python3's ctypes), else, on a Jetson only, the module's SM from the registry (fixed per module).
SM_FOUND="" SM_SOURCE=""
if command -v nvidia-smi >/dev/null 2>&1; then
  SM_FOUND=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ' || true)
  SM_SOURCE="nvidia-smi"
fi
case "$SM_FOUND" in [0-9]*.[0-9]*) ;; *) SM_FOUND="" ;; esac
if [ -z "$SM_FOUND" ] && command -v python3 >/dev/null 2>&1; then
  SM_FOUND=$(python3 -c '
import ctypes, ctypes.util
for n in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
    try:
        lib = ctypes.CDLL(n)
    except (OSError, TypeError):
        continue
    a, b = ctypes.c_int(0), ctypes.c_int(0)
    if not lib.cudaDeviceGetAttribute(ctypes.byref(a), 75, 0) and not lib.cudaDeviceGetAttribute(ctypes.byref(b), 76, 0):
        print(f"{a.value}.{b.value}")
    break
' 2>/dev/null || true)
  SM_SOURCE="cuda-runtime"
fi
case "$SM_FOUND" in [0-9]*.[0-9]*) ;; *) SM_FOUND="" ;; esac
if [ -z "$SM_FOUND" ] && [ "$IS_JETSON" = "1" ]; then
  SM_FOUND="$EXPECTED_SM" SM_SOURCE="registry"
fi
GPU_NAME=""
if command -v nvidia-smi >/dev/null 2>&1; then
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
if [ -z "$GPU_NAME" ] && [ -r /proc/device-tree/model ]; then
  GPU_NAME=$(tr -d '\0' < /proc/device-tree/model)
fi
GPU_NAME=$(printf '%s' "$GPU_NAME" | tr -d '"\\')  # it goes into JSON below

if [ "${FORCE:-0}" != "1" ]; then
  if [ "$IS_JETSON" = "1" ]; then
    # Jetson engines are tied to the JetPack's TensorRT; nvidia-smi may not report compute_cap there.
    [ "$TRT_FOUND" = "$EXPECTED_TRT" ] || die "this bundle targets TensorRT $EXPECTED_TRT (JetPack for $TARGET) but trtexec is TensorRT $TRT_FOUND; export for the JetPack this device runs, or FORCE=1 to build anyway"
  else
    [ -n "$SM_FOUND" ] || die "cannot read the GPU's compute capability (nvidia-smi --query-gpu=compute_cap); FORCE=1 to build anyway"
    [ "$SM_FOUND" = "$EXPECTED_SM" ] || die "this bundle targets SM $EXPECTED_SM ($TARGET) but this GPU is SM $SM_FOUND; rebuild the plan for this GPU, or FORCE=1 to build anyway"
    case "$TRT_FOUND" in
      "${EXPECTED_TRT%%.*}".*) ;;
      *) die "this bundle's commands are written for TensorRT ${EXPECTED_TRT%%.*}.x, found $TRT_FOUND; FORCE=1 to build anyway" ;;
    esac
  fi
fi

# build_engine COMPONENT ENGINE ONNX trtexec ARGS...
# The engine's metadata JSON is written last, atomically: a loader that requires it (and its sha256)
# never accepts a half-written engine. The previous engine is restored if the build fails.
build_engine() {
  local component="$1" engine="$2" onnx="$3"; shift 3
  local meta="${engine%.engine}.json" log="${engine%.engine}.build.log"
  [ -f "$onnx" ] || die "$component: $onnx is missing from the bundle"
  mkdir -p "$(dirname "$engine")"
  echo "==> $component: $*"
  [ -f "$meta" ] && mv -f "$meta" "$meta.prev"
  [ -f "$engine" ] && mv -f "$engine" "$engine.prev"
  if ! "$@" >"$log" 2>&1 || [ ! -s "$engine" ]; then
    tail -n 30 "$log" >&2 || true
    rm -f "$engine"
    [ -f "$engine.prev" ] && mv -f "$engine.prev" "$engine"
    [ -f "$meta.prev" ] && mv -f "$meta.prev" "$meta"
    die "$component: trtexec failed (full log: $log); the previous engine, if any, was kept"
  fi
  local sha size onnx_sha
  sha=$(sha256sum "$engine" | cut -d' ' -f1)
  size=$(wc -c <"$engine" | tr -d ' ')
  onnx_sha=$(sha256sum "$onnx" | cut -d' ' -f1)
  cat >"$meta.tmp" <<EOF
{
  "format": "@ENGINE_META_FORMAT@",
  "component": "$component",
  "engine": "$(basename "$engine")",
  "sha256": "$sha",
  "bytes": $size,
  "onnx": "$onnx",
  "onnx_sha256": "$onnx_sha",
  "target": "$TARGET",
  "tensorrt_version": "$TRT_FOUND",
  "compute_cap": "$SM_FOUND",
  "compute_cap_source": "$SM_SOURCE",
  "gpu": "$GPU_NAME",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
  mv -f "$meta.tmp" "$meta"
  rm -f "$engine.prev" "$meta.prev"
  echo "    wrote $engine ($size bytes) and $meta"
}

# verify_engine COMPONENT polygraphy ARGS (ONNX Runtime reference) ::: polygraphy ARGS (engine vs reference)
VERIFY_ROWS=""
verify_engine() {
  local component="$1"; shift
  local ref=() run=() seen=0 arg
  for arg in "$@"; do
    if [ "$arg" = ":::" ]; then seen=1; elif [ "$seen" = 0 ]; then ref+=("$arg"); else run+=("$arg"); fi
  done
  local log="${run[2]%.engine}.${component#*.}.verify.log" ok=false
  [ "${component#*.}" = "$component" ] && log="${run[2]%.engine}.verify.log"
  echo "==> verify $component: ${run[*]}"
  if "${ref[@]}" >"$log" 2>&1 && "${run[@]}" >>"$log" 2>&1; then ok=true; else tail -n 20 "$log" >&2 || true; fi
  VERIFY_ROWS="$VERIFY_ROWS${VERIFY_ROWS:+,}
    \"$component\": {\"ok\": $ok, \"log\": \"$log\", \"reference\": \"onnxruntime\"}"
}

# time_engine COMPONENT trtexec ARGS: a timing run with a per-layer profile (failures are reported, not fatal)
time_engine() {
  local component="$1"; shift
  echo "==> time $component: $*"
  local log="${component}.timing.log"
  "$@" >"$log" 2>&1 || { tail -n 20 "$log" >&2; echo "build.sh: timing $component failed (log: $log)" >&2; }
}

# write_verify FILE: the comparison results as JSON; fails the script when an engine is off
write_verify() {
  cat >"$1.tmp" <<EOF
{
  "format": "dream-export-verify/1",
  "target": "$TARGET",
  "tensorrt_version": "$TRT_FOUND",
  "components": {$VERIFY_ROWS
  }
}
EOF
  mv -f "$1.tmp" "$1"
  echo "wrote $1"
  case "$VERIFY_ROWS" in *'"ok": false'*) die "an engine differs from ONNX Runtime beyond tolerance; see $1" ;; esac
}
'''
