"""`engines/<target>/plan_check.json`: a build plan checked here before it meets the device.

Three checks, each a count that must be 0:
- `uncovered`: recorded runtime calls that fit no optimization profile (`coverage.check_plan` over
  `coverage.record_calls`, real requests on ONNX Runtime); `calls` is how many were recorded.
- `unknown_options`: arguments of the trtexec command lines `build.sh` renders (builds and timing runs)
  that the device's trtexec release does not parse (`trt_contract`, from trtexec's own sources).
- `missing_files`: bundle files those lines read (graphs, calibration caches, verification feeds and
  reference graphs) that are not in the bundle given to `build`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from dream_export.io import atomic_write_text
from dream_export.targets import trt_contract
from dream_export.targets.trtexec import GraphBuild, VerifyStep, trtexec_command, verify_step

PLAN_CHECK_FILE = "plan_check.json"


def reference_graph(manifest: dict, component: str) -> str:
    """The fp32 graph of a component (what its engine is compared with), relative to the bundle."""
    entry = manifest["graphs"][component]
    return entry.get("fp32_file") or entry["file"]


def record_verify_steps(bundle: str | Path, manifest: dict, builds: list[GraphBuild]) -> dict[str, list[VerifyStep]]:
    """Record verification feeds with the bundle's runtime into `<bundle>/verify/` and pair each planned
    engine with them and with its fp32 reference graph: one step per optimization profile the feeds fit
    (`verify/<graph>.p<i>.json`), since polygraphy runs an engine in one profile at a time."""
    from polygraphy.json import load_json, save_json

    from dream_export.runtime.trt_backend import choose_profile
    from dream_export.targets.coverage import save_verify_feeds

    root = Path(bundle)
    saved = save_verify_feeds(root, root / "verify")
    steps: dict[str, list[VerifyStep]] = {}
    for b in builds:
        if b.component not in saved:
            continue
        ref = reference_graph(manifest, b.component)
        if len(b.profiles) <= 1:
            rel = Path(saved[b.component]).resolve().relative_to(root.resolve())
            steps[b.component] = [verify_step(b, str(rel), ref)]
            continue
        ranges = [{n: (mom[0], mom[2]) for n, mom in p.items()} for p in b.profiles]
        groups: dict[int, list] = {}
        for feed in load_json(saved[b.component]):
            groups.setdefault(choose_profile(ranges, {n: tuple(a.shape) for n, a in feed.items()}), []).append(feed)
        steps[b.component] = []
        for i, feeds in sorted(groups.items()):
            rel = f"verify/{b.component}.p{i}.json"
            save_json(feeds, root / rel, description=f"{b.component} inputs for optimization profile {i}")
            steps[b.component].append(verify_step(b, rel, ref, i))
    return steps


def script_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """(kind, component, argv) of every tool line in a build.sh: kind is "build", "reference", "verify" or
    "time"; argv starts with the tool (trtexec / polygraphy)."""
    out = []
    for line in text.splitlines():
        if (line.split(None, 1) or [""])[0] not in ("build_engine", "verify_engine", "time_engine"):
            continue  # the script's own function bodies never start with these words
        words = shlex.split(line)
        kind, comp = words[0], words[1]
        if kind == "build_engine":
            out.append(("build", comp, words[words.index("trtexec"):]))
        elif kind == "time_engine":
            out.append(("time", comp, words[2:]))
        else:
            split = words.index(":::")
            out += [("reference", comp, words[2:split]), ("verify", comp, words[split + 1:])]
    return out


def script_version(text: str) -> str:
    """The TensorRT major.minor a build.sh was rendered for (its EXPECTED_TRT line)."""
    for line in text.splitlines():
        if line.startswith("EXPECTED_TRT="):
            return shlex.split(line.partition("=")[2])[0]
    raise ValueError("not a dream-export build.sh (no EXPECTED_TRT line)")


def _read_paths(kind: str, argv: list[str]) -> list[str]:
    """Bundle files a tool line reads before anything of the build exists."""
    if kind == "build":
        return [a.partition("=")[2] for a in argv if a.startswith(("--onnx=", "--calib="))]
    if kind == "reference":
        return [argv[2], argv[argv.index("--load-inputs") + 1]]
    return []


def check_script(bundle: str | Path, text: str) -> dict:
    """unknown_options / missing_files of a rendered build.sh, with the offending items."""
    version = script_version(text)
    unknown, missing = [], []
    for kind, comp, argv in script_commands(text):
        if argv[0] == "trtexec":
            unknown += [f"{comp}: {a}" for a in argv[1:]
                        if a.partition("=")[0] not in trt_contract.trtexec_options(version)]
        missing += [f"{comp}: {p}" for p in _read_paths(kind, argv) if not (Path(bundle) / p).exists()]
    return {"unknown_options": len(unknown), "missing_files": len(missing), "tensorrt": version,
            "unknown": unknown, "missing": sorted(set(missing))}


def check_build_plan(bundle: str | Path, manifest: dict, builds: list[GraphBuild],
                     verify: dict[str, list[VerifyStep]] | None, coverage: bool = True,
                     script: str | None = None) -> dict:
    """The plan's checks (module doc). `script`: the build.sh text written for the plan; None for an API
    build here (then the plan's own trtexec build commands are checked)."""
    root = Path(bundle)
    if script is not None:
        result = check_script(root, script)
    else:  # the API path: no script, the same commands
        cmds = [("build", b.component, trtexec_command(b)) for b in builds]
        unknown = [f"{c}: {a}" for (_, c, argv), b in zip(cmds, builds, strict=True) for a in argv[1:]
                   if a.partition("=")[0] not in trt_contract.trtexec_options(b.tensorrt)]
        missing = [f"{c}: {p}" for k, c, argv in cmds for p in _read_paths(k, argv) if not (root / p).exists()]
        result = {"unknown_options": len(unknown), "missing_files": len(missing), "unknown": unknown,
                  "missing": missing}
    result["verified_components"] = sorted(verify or {})
    if coverage:
        from dream_export.targets.coverage import check_plan, record_calls

        cov = check_plan(manifest, builds, record_calls(root))
        result.update(calls=cov["calls"], uncovered=cov["uncovered"], coverage=cov)
    else:
        result.update(calls=0, uncovered=None)
    return result


def write_plan_check(out_dir: str | Path, result: dict) -> dict:
    """Write `plan_check.json` (the four counts first, details after); returns `result`."""
    head = {k: result[k] for k in ("calls", "uncovered", "unknown_options", "missing_files")}
    atomic_write_text(Path(out_dir) / PLAN_CHECK_FILE, json.dumps({**head, **result}, indent=2, default=str) + "\n")
    return result
