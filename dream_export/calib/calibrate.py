"""`dream-export calibrate`: a bundle → a new INT8 (Q/DQ + TensorRT cache) or FP16 bundle.

Steps: record every graph's feeds from the bundle's own runtime on the calibration prompts
(`capture`), then per component either calibrate + quantize (`ranges`, `select`, `quantize`,
`trt_cache`, checked by `qdq_lint`) or convert to FP16 (`export/fp16.py`) with a parity report against
the fp32 graph on the same recorded feeds. Everything is written into a temporary sibling and
renamed at the end (`io.atomic_dir`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dream_export.calib import writer
from dream_export.core.graph_spec import role_tensors
from dream_export.errors import IncompatibleArtifactError, MissingBackendError, UsageError
from dream_export.export.sources import rebase_sources, relative_to_bundle
from dream_export.io import atomic_dir, atomic_write_text
from dream_export.runtime.bundle import Bundle

PRECISIONS = ("int8", "fp16")
# Fewest calibration prompts accepted: activation ranges from fewer describe those prompts, not the data.
MIN_PROMPTS = 4
# Magnitudes at or above this are mask fill values, never activations worth a scale.
_FILL = 1e30


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise MissingBackendError("calibrate needs the onnx package: pip install 'dream-export[export]'") from e


def _io_signature(path: Path) -> list[tuple[str, int]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]


def calibrate_bundle(bundle_dir: str | Path, data: str | Path, precision: str = "int8", method: str = "minmax",
                     samples: int = 64, components: list[str] | None = None, smooth_alpha: float | None = None,
                     exclude: list[str] | None = None, out: str | Path | None = None, seed: int = 0,
                     trt_version: str = "8.5.2", threads: int = 1, max_new_tokens: int = 64,
                     log=print, progress: bool = True) -> dict:
    """Write the calibrated bundle; returns the summary recorded as `manifest["calibration"]`."""
    from dream_export.calib.capture import capture_feeds
    from dream_export.calib.ranges import METHODS
    from dream_export.core.prompts import read_prompts

    _need_onnx()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    if smooth_alpha is not None and not 0.0 <= smooth_alpha <= 1.0:
        raise UsageError(f"--smoothquant ALPHA must lie in [0, 1], got {smooth_alpha}")
    if precision == "int8":
        from dream_export.calib.trt_cache import version_number

        version_number(trt_version)  # refuse a bad --trt-version before minutes of calibration
    src = Bundle.open(bundle_dir)
    not_fp32 = {g: p for g, p in src.manifest.get("precision", {}).items() if p != "fp32"}
    if not_fp32:
        raise IncompatibleArtifactError(f"{bundle_dir} is already converted ({not_fp32}); calibrate its fp32 source")
    components = components or (["target", "draft", "vision"] if precision == "int8" else list(writer.GRAPHS))
    out = Path(out) if out else writer.default_out(src.root, precision)
    if out.resolve() == src.root.resolve():
        raise UsageError("--out must differ from the source bundle")
    rows = read_prompts(data)
    if len(rows) < MIN_PROMPTS:
        raise UsageError(f"{data} has {len(rows)} prompt(s); calibration needs at least {MIN_PROMPTS} (ranges "
                         "recorded over fewer describe those prompts, not your data): add prompts to --data")
    t0 = time.time()
    log(f"recording graph inputs over {len(rows)} calibration prompts (seed {seed})...")
    cap = capture_feeds(src.root, rows, samples=samples, seed=seed, threads=threads, max_new_tokens=max_new_tokens,
                        progress=progress)
    import onnx
    import onnxruntime

    summary: dict = {"precision": precision, "components": {}, "data": str(Path(data).resolve()), "seed": seed,
                     "samples": samples, "capture": cap.summary(),
                     "source": {"path": relative_to_bundle(src.root, out),
                                "graphs": {g: src.graph(g).get("sha256") for g in writer.GRAPHS}},
                     "tools": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}}
    if precision == "int8":
        summary.update(method=method, exclude=list(exclude or []), smoothquant=smooth_alpha,
                       trt_cache={"version": trt_version, "format": "TensorRT text calibration cache"})
    reports: dict = {}
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="dream-calib-") as work:
        manifest = writer.copy_base(src, tmp)
        rebase_sources(manifest, src.root, out)  # the copy lives elsewhere: its relative paths do too
        for comp in components:
            fp32 = src.graph_path(comp)
            if precision == "int8":
                rel, info, rep = _int8(src, comp, cap.feeds[comp], method, exclude, smooth_alpha, trt_version,
                                       tmp, Path(work) / comp)
            else:
                rel, info, rep = _fp16(comp, fp32, cap.feeds[comp], tmp)
            if _io_signature(tmp / rel) != _io_signature(fp32):
                raise IncompatibleArtifactError(f"{comp}: the converted graph changed its inputs/outputs")
            writer.set_graph(manifest, tmp, comp, rel, precision)
            summary["components"][comp] = info
            reports[comp] = rep
            log(f"  {comp}: {_describe(precision, info)}")
        summary["seconds"] = round(time.time() - t0, 1)
        manifest["calibration"] = summary
        writer.write_manifest(tmp, manifest)
        name = "calib_lint.json" if precision == "int8" else "fp16_parity.json"
        atomic_write_text(tmp / "reports" / name, json.dumps(reports, indent=2))
        bad = [f"{c}: {e['message']}" for c, r in reports.items() for e in r.get("errors", [])]
        if precision == "int8" and bad:
            raise IncompatibleArtifactError("Q/DQ graphs fail the TensorRT lint:\n  " + "\n  ".join(bad[:20]))
    summary["out"] = str(out)
    log(f"wrote {out} ({precision}: {', '.join(components)}) in {summary['seconds']}s")
    return summary


def _int8(src: Bundle, comp: str, feeds, method, exclude, smooth_alpha, trt_version, tmp: Path, work: Path):
    import onnx

    from dream_export.calib.qdq_lint import lint_qdq
    from dream_export.calib.quantize import quantize_graph
    from dream_export.calib.select import select_nodes
    from dream_export.calib.trt_cache import write_cache

    fp32 = src.graph_path(comp)
    # the un-normalized input streams (token embeddings, pixels) and the KV caches, by their spec roles
    sel = select_nodes(onnx.load(str(fp32), load_external_data=False), src.dims["vocab"], exclude,
                       role_tensors(src.graph(comp), comp, "embeds", "pixels"))
    rel = f"onnx-int8/{comp}.onnx"
    res = quantize_graph(fp32, tmp / rel, feeds, method, sel, work, smooth_alpha)
    skip = sel.cache_skip | role_tensors(src.graph(comp), comp, "cache", "cache_rows")
    amax = {t: a for t, a in res.amax.items() if t not in skip and np.isfinite(a) and a < _FILL}
    cache = f"calib/{comp}.cache"
    write_cache(tmp / cache, amax, trt_version)
    atomic_write_text(tmp / f"calib/{comp}.amax.json", json.dumps(amax, indent=1, sort_keys=True))
    lint = lint_qdq(tmp / rel)
    # TensorRT 9+ builds Q/DQ graphs strongly typed: its twin with FP16 everywhere else is what it builds
    from dream_export.calib.quantize import fp16_qdq

    trt_rel = f"onnx-int8/{comp}.fp16.onnx"
    kept = fp16_qdq(tmp / rel, tmp / trt_rel, work / "fp16")
    info = {"file": rel, "fp32_file": src.graph(comp)["file"], **sel.summary(), **res.info,
            "trt_cache": cache, "trt_cache_tensors": len(amax), "trt_lint_ok": lint["ok"],
            "smoothquant": res.smoothquant, "trt_strongly_typed_file": trt_rel, "trt_kept_fp32": kept}
    return rel, info, lint


def _fp16(comp: str, fp32: Path, feeds, tmp: Path):
    from dream_export.export.fp16 import convert_graph
    from dream_export.export.parity import compare_graphs

    rel = f"onnx-fp16/{comp}.onnx"
    kept = convert_graph(fp32, tmp / rel)
    parity = compare_graphs(fp32, tmp / rel, feeds, "fp16")
    return rel, {"file": rel, "kept_fp32": kept, "parity_ok": parity["ok"], "max_rel": parity["max_rel"]}, parity


def _describe(precision: str, info: dict) -> str:
    if precision == "int8":
        return (f"{info['quantized']} linears INT8, kept {info['kept']}; TensorRT cache {info['trt_cache_tensors']} "
                f"tensors; lint {'ok' if info['trt_lint_ok'] else 'FAILED'}")
    worst = max(info["max_rel"].values()) if info["max_rel"] else 0.0
    return f"FP16, worst output error {worst:.2e} of scale on recorded feeds ({'ok' if info['parity_ok'] else 'over tolerance'})"
