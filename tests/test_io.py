"""Artifacts are written atomically: a failure leaves the previous artifact intact."""

import pytest

from dream_export.io import atomic_dir, atomic_write_text


def test_failed_write_keeps_previous_artifact(tmp_path):
    target = tmp_path / "bundle"
    with atomic_dir(target) as d:
        (d / "manifest.json").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "manifest.json").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "manifest.json").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary left behind


def test_successful_write_replaces(tmp_path):
    target = tmp_path / "bundle"
    for v in ("v1", "v2"):
        with atomic_dir(target) as d:
            (d / "x").write_text(v)
    assert (target / "x").read_text() == "v2"
    atomic_write_text(tmp_path / "r.json", "{}")
    assert (tmp_path / "r.json").read_text() == "{}"
