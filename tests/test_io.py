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


def test_bytes_write_and_full_digest(tmp_path):
    import hashlib

    from dream_export.io import atomic_write_bytes, file_digest

    data = bytes(range(256)) * 5000  # over one read chunk
    atomic_write_bytes(tmp_path / "engine.plan", data)
    assert (tmp_path / "engine.plan").read_bytes() == data
    assert file_digest(tmp_path / "engine.plan") == hashlib.sha256(data).hexdigest()  # all 64 hex digits
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]


def test_bundle_of_an_older_format_is_refused_with_what_to_do(demo_bundle, tmp_path):
    import json
    import shutil

    from dream_export.errors import IncompatibleArtifactError
    from dream_export.export.bundle import FORMAT_VERSION
    from dream_export.io import file_digest
    from dream_export.runtime.bundle import SUPPORTED_FORMAT_VERSIONS, Bundle

    m = json.loads((demo_bundle / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION in SUPPORTED_FORMAT_VERSIONS
    assert m["graphs"]["target"]["sha256"] == file_digest(demo_bundle / m["graphs"]["target"]["file"])
    old = tmp_path / "old"
    shutil.copytree(demo_bundle, old)
    m["format_version"] = 1  # 16-hex-digit digests
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleArtifactError, match=r"format 1, older .*re-export it with `dream-export export`"):
        Bundle.open(old)
