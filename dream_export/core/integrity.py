"""The digest of every file of an artifact directory: recorded in its manifest, verified on load.

`record(root)` lists each file (relative path → bytes and sha256); `verify(root, files, full)` checks
sizes always (cheap: one stat per file) and the sha256 too when `full`. Verification only reads, so a
bundle on read-only storage can be checked. Files not listed (reports, TensorRT engines, which carry
their own digests in their metadata) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from dream_export.errors import IntegrityError
from dream_export.io import file_digest

# Not part of an artifact's identity: the manifest itself, and what commands add later beside it.
_SKIP_TOP = ("manifest.json", "reports")


def record(root: str | Path, skip: tuple[str, ...] = ("engines",)) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `root` (hidden files, reports and the
    top-level `skip` folders excepted)."""
    root = Path(root)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0] in (*_SKIP_TOP, *skip) or any(s.startswith(".") for s in rel.parts):
            continue
        files[rel.as_posix()] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
    return files


def verify(root: str | Path, files: dict[str, dict], full: bool = False) -> None:
    """Raise `IntegrityError` naming the first file that is missing, of another size or (`full`) digest."""
    root = Path(root)
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            raise IntegrityError(f"{p} is missing from the bundle; re-export it (or copy the whole bundle again)")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise IntegrityError(f"{p} has {size} bytes, the manifest records {want['bytes']} (truncated or "
                                 "changed after export); re-export the bundle or copy it again")
        if full and file_digest(p) != want["sha256"]:
            raise IntegrityError(f"{p} does not match the sha256 its manifest records (corrupted or changed "
                                 "after export); re-export the bundle or copy it again")
