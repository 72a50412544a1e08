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


def _tree_commands():
    """(command path, option) of every command that takes a tree shape."""
    from dream_export.cli import cli
    from dream_export.options import TreeSpecType

    return [(name, opt) for name, cmd in cli.commands.items() for p in cmd.params
            if isinstance(p.type, TreeSpecType) for opt in p.opts]


def test_every_tree_option_takes_one_type_and_default():
    from dream_export.options import DEFAULT_TREE
    from dream_export.runtime.tree import TreeSpec

    found = _tree_commands()
    assert {c for c, _ in found} >= {"run", "bench", "eval-draft", "plan", "profile", "calib-report"}
    assert DEFAULT_TREE == TreeSpec(4, 6, 32)


@pytest.mark.parametrize("bad", ["4x6", "4,6", "0,6,32"])
def test_bad_tree_is_a_usage_error_in_every_command(tmp_path, bad):
    from click.testing import CliRunner

    from dream_export.cli import cli

    for name, opt in _tree_commands():
        r = CliRunner().invoke(cli, [name, str(tmp_path), opt, bad])
        assert r.exit_code == 2, (name, r.output)
        assert f"Invalid value for '{opt}'" in r.output, (name, r.output)
        assert "K,DEPTH,TOTAL" in r.output or "tree needs" in r.output, (name, r.output)


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


def test_bench_plot_writes_a_figure(tmp_path):
    from dream_export.plots import bench_plot

    summary = {"accept_histogram": [0, 3, 5, 2], "tau": 2.9, "speedup": 2.1,
               "time_split_seconds": {"vision": 0.1, "prefill": 0.2, "draft": 0.5, "verify": 0.9, "host": 0.1}}
    bench_plot(summary, tmp_path / "plots" / "bench.png")
    assert (tmp_path / "plots" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
