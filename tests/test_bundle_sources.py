"""A bundle records its source checkpoints relative to itself: it can move together with them, and no
machine's absolute paths are written into it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from dream_export.cli import cli
from dream_export.export.sources import source_dir

try:
    from tests.bundle_fixture import cached_tiny_bundle
except ImportError:  # run from tests/
    from bundle_fixture import cached_tiny_bundle


def _plan(bundle: Path) -> dict:
    res = CliRunner().invoke(cli, ["plan", str(bundle), "--target", "jetson-orin-nano-8gb", "--json"])
    return {"code": res.exit_code, "out": res.output}


def test_manifest_paths_are_relative_and_survive_a_move(tmp_path_factory, tmp_path):
    bundle = cached_tiny_bundle(tmp_path_factory.mktemp("tiny"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    for which in ("target", "draft"):
        recorded = manifest["source"][which]["path"]
        assert not Path(recorded).is_absolute(), recorded
        assert source_dir(manifest, bundle, which) == (bundle.parent / which).resolve()
    before = _plan(bundle)
    assert before["code"] == 0, before["out"]

    moved = tmp_path / "elsewhere"
    for name in ("target", "draft", "bundle"):
        shutil.copytree(bundle.parent / name, moved / name)
    after = _plan(moved / "bundle")
    assert after == before  # the same sources are found beside the moved bundle

    alone = tmp_path / "alone" / "bundle"
    shutil.copytree(bundle, alone)
    res = CliRunner().invoke(cli, ["plan", str(alone), "--target", "jetson-orin-nano-8gb"])
    assert res.exit_code != 0 and "is not on this machine" in f"{res.output}{res.exception}"
