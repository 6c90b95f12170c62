"""One logging setup for the CLI, Ray Data actors and Ray Train workers."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "[diclip] %(asctime)s %(levelname)s %(name)s: %(message)s"
_warned: set[str] = set()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (not the stream at set-up, which a test runner or a
    redirect may have closed since)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def init_logging(level: str | int | None = None) -> None:
    """Configure the ``diclip`` logger once per process (idempotent).

    Level comes from the argument, else ``DICLIP_LOG_LEVEL``, else INFO.
    """
    level = level or os.environ.get("DICLIP_LOG_LEVEL", "INFO")
    root = logging.getLogger("diclip")
    if not any(getattr(h, "_diclip", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._diclip = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    for name in ("ray_jobs",):
        lg = logging.getLogger(name)
        lg.handlers = root.handlers
        lg.propagate = False
        lg.setLevel(root.level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(("diclip", "ray_jobs")) else f"diclip.{name}")


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log a warning the first time this exact message is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


QUIET_LOGGERS = ("", "ray.data", "ray.train", "ray.air")
"""Loggers held at WARNING in every diclip process: the root (open_clip's "Parsing tokenizer identifier" per
model load; Ray Train sets a worker's root to INFO) and Ray libraries' own, which keep INFO below the root
("Dataset ... execution finished", "Reporting training result"): one line per call in every job log."""

FALSE_NOTICES = (
    "Progress bars disabled",  # Ray Data's WARNING when a run turns its bars off on purpose (not a terminal)
    # Ray Data at every training start: the loader's tasks wait while Ray Train's workers hold the CPUs
    # they were planned around; training's own watchdog names a real stall (ray_jobs.stages.train.TrainWatchdog)
    "Cluster resources are not enough to run any task from TaskPoolMapOperator[MapBatches(load_rows)]",
)


class _DropFalseNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in FALSE_NOTICES)


def quiet_library_logs() -> None:
    """Job logs carry diclip's lines and the libraries' warnings, not their progress notes: the loggers of
    ``QUIET_LOGGERS`` go to WARNING, and warnings known to be false here (``FALSE_NOTICES``) are dropped
    at Ray Data's handlers. Idempotent; diclip's own loggers keep their level."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if not any(isinstance(f, _DropFalseNotices) for f in handler.filters):
            handler.addFilter(_DropFalseNotices())
