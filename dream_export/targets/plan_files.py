"""Which files of a bundle each planned engine reads, chosen from what the bundle really holds.

`make_build` knows the bundle layout; this module knows a particular bundle. What the commands write:

- `dream-export export` writes the fp32 graphs (`onnx/`) and, with `--precision fp16`, FP16 variants
  (`onnx-fp16/`, recorded under `manifest["graphs"][c]["variants"]["fp16"]`).
- `dream-export calibrate --precision int8` writes a *new* bundle: the components it converts (by default
  only the target) point at their Q/DQ graph (`onnx-int8/<c>.onnx`, `manifest["precision"][c] == "int8"`)
  with a TensorRT calibration cache (`calib/<c>.cache`, measured on the fp32 graph, whose tensor names it
  holds); every other component keeps its fp32 graph; no `onnx-fp16/` is copied.
- `dream-export calibrate --precision fp16` points every component at `onnx-fp16/<c>.onnx`.

`calibrate` also writes `onnx-int8/<c>.fp16.onnx`, the Q/DQ graph with FP16 scales and FP16 everywhere it
does not quantize (`calib.quantize.fp16_qdq`). So an INT8 plan builds each calibrated component from that
graph (`--stronglyTyped`, TensorRT 9+: types come from the graph, so the rest runs FP16, not FP32) or
from its fp32 graph plus the cache (implicit INT8, 8.x), and every other component as FP16; an FP16 plan
uses the FP16 graph when the bundle has one, else the fp32 graph with `--fp16` (TensorRT picks FP16
kernels itself). A plan that would need a file the bundle lacks is refused, naming the command that
writes it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dream_export.errors import UsageError
from dream_export.targets import trt_contract
from dream_export.targets.trtexec import GraphBuild

# JetPack's TensorRT patch release per major.minor: the version a calibration cache header must carry.
_FULL_VERSION = {"8.5": "8.5.2", "8.6": "8.6.2"}


def is_static(entry: dict) -> bool:
    """Whether a manifest graph entry has only concrete input dims (trtexec then refuses shapes)."""
    return all(isinstance(d, int) for io in entry["inputs"] for d in io["shape"])


def _calibrate_hint(bundle: Path, component: str, trt: str) -> str:
    version = _FULL_VERSION.get(trt, f"{trt}.0")
    return (f"dream-export calibrate {bundle} --data PROMPTS.jsonl --precision int8 --components {component} "
            f"--trt-version {version}")


def _cache_version(path: Path) -> str | None:
    """major.minor named by a calibration cache header (TRT-8502-EntropyCalibration2 -> 8.5)."""
    head = path.read_text().split("\n", 1)[0]
    code = head.split("-")[1] if head.startswith("TRT-") and head.count("-") >= 2 else ""
    if not code.isdigit():
        return None
    n = int(code)
    return f"{n // 10000}.{n // 100 % 100}" if n >= 10000 else f"{n // 1000}.{n // 100 % 10}"


def bind_to_bundle(builds: list[GraphBuild], manifest: dict, bundle: str | Path, precision: str) -> tuple[
        list[GraphBuild], list[str]]:
    """`builds` pointed at the files of `bundle` (see the module doc), static graphs marked; returns the
    builds and notes for the user (components built at another precision than asked, and why)."""
    root = Path(bundle)
    graphs, precisions = manifest["graphs"], manifest.get("precision", {})
    calibration = manifest.get("calibration", {}).get("components", {})
    if precision == "int8" and "int8" not in precisions.values():
        raise UsageError(f"{root} has no INT8 graphs: run `{_calibrate_hint(root, 'target', builds[0].tensorrt)}` "
                         "and build the bundle it writes (BUNDLE-int8)")
    out, notes = [], []
    for b in builds:
        entry = graphs[b.component]
        mine = precisions.get(b.component, "fp32")
        fp32 = entry.get("fp32_file") or (entry["file"] if mine == "fp32" else None)
        fp16 = entry.get("variants", {}).get("fp16", {}).get("file") or (entry["file"] if mine == "fp16" else None)
        fields: dict = {"static": is_static(entry), "strongly_typed": False, "int8": False, "fp16": False,
                        "calib_cache": None}
        if precision == "int8" and mine == "int8":
            if trt_contract.has_option(b.tensorrt, "--stronglyTyped"):
                # the Q/DQ graph's FP16 twin (calibrate writes it): strongly typed, the rest runs FP16
                twin = calibration.get(b.component, {}).get("trt_strongly_typed_file")
                if not twin or not (root / twin).exists():
                    raise UsageError(f"{b.component}: {root} has no FP16 Q/DQ graph for TensorRT {b.tensorrt}'s "
                                     f"strongly typed build (calibrated by an older dream-export); run "
                                     f"`{_calibrate_hint(root, b.component, b.tensorrt)}`")
                fields.update(onnx=twin, strongly_typed=True)
            else:
                cache = calibration.get(b.component, {}).get("trt_cache") or f"calib/{b.component}.cache"
                if not (root / cache).exists():
                    raise UsageError(f"{b.component}: {cache} is missing from {root}; run "
                                     f"`{_calibrate_hint(root, b.component, b.tensorrt)}`")
                written = _cache_version(root / cache)
                if written != b.tensorrt:
                    raise UsageError(f"{b.component}: {cache} was written for TensorRT {written}, the device runs "
                                     f"{b.tensorrt}, which refuses it; run `{_calibrate_hint(root, b.component, b.tensorrt)}`")
                fields.update(onnx=fp32, int8=True, fp16=True, calib_cache=cache)
        elif precision in ("fp16", "int8"):
            if precision == "int8":
                notes.append(f"{b.component}: not calibrated in this bundle, built FP16")
            fields.update(onnx=fp16 or fp32, fp16=True)
        else:
            fields.update(onnx=fp32)
        if not fields["onnx"]:
            raise UsageError(f"{b.component}: {root} holds no graph for a {precision} build")
        out.append(dataclasses.replace(b, **fields))
    return out, notes


def named_paths(build: GraphBuild) -> dict[str, str]:
    """The bundle files a build command reads (the ones that must exist before it runs)."""
    return {k: v for k, v in (("onnx", build.onnx), ("calib_cache", build.calib_cache)) if v}
