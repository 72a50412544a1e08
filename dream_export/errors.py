"""One exception hierarchy for expected failures; the CLI turns these into one-line messages (exit 2).

Every message says what was wrong (naming the file, option or value) and what to do. The Python API
raises the same classes, so a caller can tell a bad request (`UsageError`) from a bad artifact
(`IncompatibleArtifactError`, `IntegrityError`) without parsing text.
"""

from __future__ import annotations

import errno


class DreamExportError(Exception):
    """An expected failure: the message says what was wrong and what to do."""


class UsageError(DreamExportError):
    """Bad input from the user (paths, options, data files, requests)."""


class IncompatibleArtifactError(DreamExportError):
    """An artifact (bundle, checkpoint, engine) does not match what this command needs."""


class IntegrityError(IncompatibleArtifactError):
    """A file of an artifact is missing, truncated or changed since it was written."""


class MissingBackendError(DreamExportError):
    """An optional dependency (torch, TensorRT, a GPU) is not available here."""


class StorageError(DreamExportError):
    """The file system refused a read or write (disk full, permission denied, read-only)."""


def from_os_error(e: OSError) -> DreamExportError:
    """An `OSError` from reading or writing an artifact as the expected failure it is, naming the file."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left on the device{where}; free some space and rerun (nothing was kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{e.strerror or 'permission denied'}{where}; check the path's permissions")
    return StorageError(f"{e.strerror or e}{where}")
