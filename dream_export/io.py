"""Artifact files: atomic writes (build in a temporary sibling, rename on success) and file digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target` in one rename.

    On failure the temporary directory is removed and any previous `target` is left untouched, so an
    interrupted command never leaves a half-written artifact that loads.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the artifact gets a normal directory's mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # it now holds the previous artifact
        return
    old = None
    if target.exists():  # no atomic exchange here: a kill between these two renames leaves only `old`
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE), so that `b` is never missing,
    not even for an instant; False where the platform or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via a temporary sibling and rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) via a temporary sibling and rename."""
    atomic_write_bytes(path, text.encode())


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file as 64 hex digits, read in chunks (graphs and engines run to gigabytes): the
    identity artifacts record for their inputs (manifest `sha256` fields, `pairs_with`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def warmup_cosine(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate: linear warm-up, then cosine decay to `min_ratio · lr` at `total` steps."""
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
