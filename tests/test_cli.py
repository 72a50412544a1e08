"""The command line: help that explains, JSON for scripts, short errors with exit code 2."""

import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "dream_export.cli", *args], capture_output=True, text=True)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "demo-model", "train-draft", "eval-draft"):
        assert cmd in r.stdout


def test_missing_model_is_a_short_error(tmp_path):
    r = run("demo", "--model", str(tmp_path / "nope"), "-n", "1")
    assert r.returncode == 2
    assert "holds no model" in r.stderr and "Traceback" not in r.stderr


def test_bad_tree_spec_is_rejected(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "prompt": "hi"}\n')
    (tmp_path / "m").mkdir()
    (tmp_path / "dr").mkdir()
    r = run("eval-draft", str(tmp_path / "m"), "--draft", str(tmp_path / "dr"), "--data", str(tmp_path / "d.jsonl"),
            "--tree", "4x6")
    assert r.returncode == 2 and "K,DEPTH,TOTAL" in r.stderr


@pytest.mark.timeout(600)
def test_demo_eval_json_reports_accuracy_per_task(tmp_path):
    r = run("demo", "-n", "2", "--eval", "--per-task", "4", "--json", "--out", str(tmp_path), "--no-speculate")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    acc = summary["accuracy"]
    assert set(acc) == {"describe", "count", "color", "position", "read"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert len(summary["answers"]) == 2 and all(a["answer"] for a in summary["answers"])
    assert json.loads((tmp_path / "demo.json").read_text())["accuracy"] == acc
