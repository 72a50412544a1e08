"""`calibrate` / `calib-report` on the command line: clear one-line errors (exit 2) and a working run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

try:
    from tests.calib_fixture import prompt_files
except ImportError:  # tests/ itself on sys.path
    from calib_fixture import prompt_files


def run(*args):
    return subprocess.run([sys.executable, "-m", "dream_export.cli", *map(str, args)], capture_output=True,
                          text=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def _one_line_error(r, text):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,text", [
    (["calibrate", "{tmp}/nope", "--data", "{calib}"], "is not a bundle"),
    (["calibrate", "{bundle}", "--data", "{tmp}/missing.jsonl"], "not found"),
    (["calibrate", "{bundle}", "--data", "{calib}", "--components", "target,lm"], "--components"),
    (["calibrate", "{bundle}", "--data", "{calib}", "--smoothquant", "lots"], "--smoothquant"),
    (["calibrate", "{bundle}", "--data", "{calib}", "--smoothquant", "2"], "[0, 1]"),
    (["calibrate", "{bundle}", "--data", "{calib}", "--exclude", "layer:x"], "layer:I"),
    (["calibrate", "{bundle}", "--data", "{calib}", "--trt-version", "7.1"], "TensorRT 8"),
    (["calib-report", "{bundle}", "--data", "{calib}", "--make", "int4"], "--make"),
    (["calib-report", "{bundle}", "--data", "{calib}", "--make", "fp16"], "--calib-data"),
])
def test_bad_input_is_a_one_line_error(demo_bundle, tmp_path, args, text):
    calib, _ = prompt_files(tmp_path / "p")
    fill = {"tmp": tmp_path, "calib": calib, "bundle": demo_bundle}
    _one_line_error(run(*[a.format(**fill) for a in args]), text)


def test_bad_data_line_is_a_one_line_error(demo_bundle, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no image"}\n')
    _one_line_error(run("calibrate", demo_bundle, "--data", bad), "needs \"image\"")


@pytest.mark.slow
def test_calibrate_and_report_from_the_command_line(demo_bundle, tmp_path):
    calib, heldout = prompt_files(tmp_path / "p")
    out = tmp_path / "b-int8"
    r = run("calibrate", demo_bundle, "--data", calib, "--samples", 8, "--out", out, "--report", heldout, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["components"].keys() == {"target"} and summary["report"].endswith("calib.json")
    rep = json.loads((out / "reports" / "calib.json").read_text())
    assert set(rep["precisions"]) == {"fp32", "int8-target"}
    image = heldout.parent / json.loads(heldout.read_text().splitlines()[0])["image"]
    r = run("run", out, "--image", image, "--prompt", "Count the shapes.", "--max-new-tokens", 8, "--json")
    assert r.returncode == 0, r.stderr
