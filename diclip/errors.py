"""User-facing errors.

A ``DiclipError`` is a mistake the user can fix (bad config key, missing file, unreachable store,
cache/model mismatch). The CLI prints ``error: <message>`` on one line and exits with status 2
instead of a traceback; everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class DiclipError(Exception):
    """A problem with the user's inputs, stated in one line that names the culprit and the fix."""

    def __init__(self, message: str):
        # Keep it to one line so logs and CLI output stay greppable.
        super().__init__(" ".join(str(message).split()))


class ConfigError(DiclipError):
    """Unknown key, wrong type or invalid value in a config or job spec."""


class StorageError(DiclipError):
    """A URI cannot be read or written (missing object, unreachable endpoint, bad scheme)."""


class DataError(DiclipError):
    """A dataset item is missing or corrupt, or the class list does not match the data."""


class ModelError(DiclipError):
    """Weights cannot be loaded, or two artifacts disagree (e.g. cache dim vs CLIP embed dim)."""


class StageFailed(DiclipError):
    """Too many items of a stage failed: no manifest was written, so the stage is not complete."""


class StageFault(DiclipError):
    """The cluster or the store failed a stage beyond its retries (a node lost too often, a store away longer
    than ``storage.retry_budget_s``): not the user's mistake, and worth retrying. The message says what failed,
    what was kept and where a re-run resumes; the CLI exits with 75 (EX_TEMPFAIL)."""
