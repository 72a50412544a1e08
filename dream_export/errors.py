"""One exception hierarchy for expected failures; the CLI turns these into short messages (exit 2)."""


class DreamExportError(Exception):
    """An expected failure: the message says what was wrong and what to do."""


class UsageError(DreamExportError):
    """Bad input from the user (paths, options, data files)."""


class IncompatibleArtifactError(DreamExportError):
    """An artifact (bundle, checkpoint, engine) does not match what this command needs."""


class MissingBackendError(DreamExportError):
    """An optional dependency (torch, TensorRT, a GPU) is not available here."""
