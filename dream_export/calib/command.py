"""Click commands `calibrate` and `calib-report` (registered on the main CLI group in `cli.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dream_export.errors import UsageError
from dream_export.options import tree_option
from dream_export.runtime.tree import TreeSpec

# The variants `calib-report --make` builds, as (name, precision, components).
MAKE = {"fp16": ("fp16", "vision,target,draft"), "int8-target": ("int8", "target"),
        "int8-all": ("int8", "vision,target,draft")}


def _alpha(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError as e:
        raise UsageError(f"--smoothquant takes a number in [0, 1] (e.g. 0.5), got {value!r}") from e


def _answer_key():
    """The accuracy scorer the main CLI group provides (the demo's, `cli.py`); None outside it."""
    ctx = click.get_current_context(silent=True)
    return ((ctx.find_root().obj or {}) if ctx else {}).get("answer_key")


@click.command("calibrate")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help='Calibration prompts, JSONL of {"image": path, "prompt": text} (demo: OUT/calib.jsonl).')
@click.option("--precision", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True)
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="Activation range method (onnxruntime calibrators; INT8 only).")
@click.option("--samples", default=64, show_default=True, help="Recorded feeds per graph (split over its stages).")
@click.option("--components", default=None,
              help="Graphs to convert, comma list of target,draft,vision or 'all' [int8: target; fp16: all].")
@click.option("--smoothquant", "smoothquant", default=None, metavar="ALPHA",
              help="SmoothQuant the quantized linears with migration strength ALPHA (e.g. 0.5).")
@click.option("--exclude", default="", help="Keep more nodes float: name globs, op types or layer:I (comma list).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output bundle [BUNDLE-int8 / BUNDLE-fp16 beside BUNDLE].")
@click.option("--seed", default=0, show_default=True, help="Prompt order and feed sampling.")
@click.option("--trt-version", default="8.5.2", show_default=True,
              help="TensorRT release of the calibration cache header (the device's; JetPack 5.1: 8.5.2).")
@click.option("--threads", default=1, show_default=True, help="ONNX Runtime threads while recording.")
@click.option("--report", "report_data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write OUT/reports/calib.json: fp32 vs the new bundle on these held-out prompts.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
def calibrate_cmd(bundle: Path, data_path: Path, precision: str, method: str, samples: int, components: str | None,
                  smoothquant: str | None, exclude: str, out: Path | None, seed: int, trt_version: str,
                  threads: int, report_data: Path | None, as_json: bool) -> None:
    """Convert BUNDLE to INT8 (Q/DQ ONNX + TensorRT calibration caches) or FP16, as a new bundle.

    Calibration data come from the bundle's own runtime: every graph's inputs are recorded while it
    answers the --data prompts (vision, prefill, tree verification, draft context and tree steps).
    The new bundle runs with `dream-export run/bench` as it is; for implicit INT8 on TensorRT 8.x use
    its fp32 graphs with `trtexec --int8 --calib=OUT/calib/<graph>.cache`.
    """
    from dream_export.calib.calibrate import calibrate_bundle
    from dream_export.calib.select import parse_exclude
    from dream_export.calib.writer import parse_components

    comps = parse_components(components) if components else (["target"] if precision == "int8" else None)
    summary = calibrate_bundle(bundle, data_path, precision, method, samples, comps, _alpha(smoothquant),
                               parse_exclude(exclude), out, seed, trt_version, threads,
                               log=(lambda _s: None) if as_json else click.echo, progress=not as_json)
    if report_data is not None:
        from dream_export.calib.report import calib_report

        out_dir = Path(summary["out"])
        summary["report"] = calib_report([(None, bundle), (None, out_dir)], report_data,
                                         out_dir / "reports" / "calib.json",
                                         log=(lambda _s: None) if as_json else click.echo,
                                         progress=not as_json, answer_key=_answer_key())["out"]
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))


@click.command("calib-report")
@click.argument("bundles", nargs=-1, required=True)
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Held-out prompts (demo: OUT/heldout.jsonl); count/colour rows with a reference are scored.")
@click.option("--make", default="", help="First build these from the fp32 BUNDLE: fp16,int8-target,int8-all.")
@click.option("--calib-data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration prompts for --make.")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="Range method for --make's INT8 bundles.")
@click.option("--samples", default=64, show_default=True, help="Recorded feeds per graph for --make.")
@click.option("--smoothquant", default=None, metavar="ALPHA", help="SmoothQuant for --make's INT8 bundles.")
@click.option("--exclude", default="", help="--exclude for --make's INT8 bundles.")
@tree_option()
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N prompts.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Report file [first BUNDLE/reports/calib.json].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (last line).")
def calib_report_cmd(bundles: tuple[str, ...], data_path: Path, make: str, calib_data: Path | None, method: str,
                     samples: int, smoothquant: str | None, exclude: str, tree: TreeSpec, max_new_tokens: int,
                     limit: int | None, out: Path | None, as_json: bool) -> None:
    """τ, greedy agreement with fp32, demo accuracy and size for each bundle (the first is the fp32 reference).

    BUNDLES are paths or NAME=PATH. With --make, the fp16 / INT8 variants are first built beside the
    first bundle (BUNDLE-fp16, BUNDLE-int8-target, BUNDLE-int8-all), so one command re-measures everything.
    """
    from dream_export.calib.calibrate import calibrate_bundle
    from dream_export.calib.report import calib_report
    from dream_export.calib.select import parse_exclude
    pairs: list[tuple[str | None, Path]] = []
    for b in bundles:
        name, sep, path = b.partition("=")
        pairs.append((name, Path(path)) if sep else (None, Path(b)))
    say = (lambda _s: None) if as_json else click.echo
    wanted = [m.strip() for m in make.split(",") if m.strip()]
    bad = [m for m in wanted if m not in MAKE]
    if bad:
        raise UsageError(f"--make takes {', '.join(MAKE)}; unknown: {', '.join(bad)}")
    if wanted and calib_data is None:
        raise UsageError("--make needs --calib-data (calibration prompts, e.g. the demo's calib.jsonl)")
    base = pairs[0][1]
    for name in wanted:
        precision, comps = MAKE[name]
        dst = base.resolve().with_name(f"{base.resolve().name}-{name}")
        say(f"building {name} -> {dst}")
        calibrate_bundle(base, calib_data, precision, method, samples, comps.split(","), _alpha(smoothquant),
                         parse_exclude(exclude), dst, log=say, progress=not as_json)
        pairs.append((name, dst))
    report = calib_report(pairs, data_path, out, tree, max_new_tokens, limit, log=say, progress=not as_json,
                          answer_key=_answer_key())
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))


COMMANDS = (calibrate_cmd, calib_report_cmd)
