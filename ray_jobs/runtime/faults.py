"""Faults that end a stage, as one line: what failed, what is kept, where a re-run resumes.

Ray and the object store fail in their own words (``WorkerGroupError`` with a traceback per worker,
``RayActorError``, an S3 ``internal error`` on some index file). A person reading the job log needs one
line instead: the stage, the cause, what the run committed, and that running again resumes from there.
Mistakes in the user's inputs stay as they are (their line already says what to fix); errors that are
neither (bugs) keep their traceback.
"""
from __future__ import annotations

import traceback

from diclip import storage
from diclip.config import JobSpec
from diclip.errors import DiclipError, StageFailed, StageFault, StorageError
from diclip.logging import get_logger
from ray_jobs.runtime.ray_compat import is_system_failure

log = get_logger(__name__)
_REASON_CHARS = 300


def is_fault(e: BaseException) -> bool:
    """Errors of the machinery rather than of the inputs or the code, i.e. worth running again: a store away
    past its budget (or an I/O error that is an outage), and Ray's system failures (lost nodes, dead actors
    or workers), also inside Ray Train's and Ray Data's wrappers. A task or worker that raised (a bug, an
    out-of-memory error in the code) is not one: it keeps its traceback, and a retry would only repeat it."""
    import pyarrow as pa

    if isinstance(e, StorageError):  # an outage beyond the budget; a missing bucket is the user's to fix
        return storage.is_transient(e)
    if isinstance(e, DiclipError):
        return False
    if isinstance(e, (OSError, pa.ArrowException)):
        return storage.is_transient(e)
    return is_system_failure(e)


def reason(e: BaseException) -> str:
    """The cause in one short line: a DiclipError's own line; else the error type and the first line of its
    message that says something (Ray's messages start with boilerplate and end with tracebacks)."""
    if isinstance(e, DiclipError):
        return str(e)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    lines = [ln for ln in lines if not ln.startswith(("ray::", "File "))] or lines
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "Training failed due to worker errors:" + what they were
        text = f"{text} {lines[1]}"
    text = " ".join(text.split())
    if len(text) > _REASON_CHARS:
        text = text[: _REASON_CHARS - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def kept(spec: JobSpec, stage: str, output: str | None) -> str:
    """What a re-run starts from, in words (best effort: the store may be the thing that failed)."""
    try:
        with storage.retry_budget(0):
            if stage == "train":
                from ray_jobs.stages import train

                ckpt = train.interrupted_checkpoint(spec)
                if ckpt is None:
                    return "no checkpoint was committed yet, so a re-run trains from step 0"
                return f"training resumes from the checkpoint at step {train.read_checkpoint_step(ckpt)} ({ckpt})"
            if output:
                from diclip.storage.commit_index import CommitIndex

                n = len(CommitIndex.load(output))
                return f"{n} committed item(s) in {output} are kept and skipped by a re-run"
    except Exception:  # noqa: BLE001 - describing what is kept must not hide the fault
        pass
    return "what was committed is kept"


def as_stage_fault(spec: JobSpec, stage: str, output: str | None, e: BaseException) -> StageFault:
    """The one line for a fault; the full traceback goes to the debug log (``--log-level DEBUG``)."""
    log.debug("stage %s failed:\n%s", stage, "".join(traceback.format_exception(e)))
    return StageFault(f"{stage}: {reason(e)}; {kept(spec, stage, output)}; run again to resume")


def wrap(spec: JobSpec, stage: str, output: str | None, e: BaseException) -> BaseException:
    """``e`` as a stage should end with it: a fault as one :class:`StageFault` line, anything else as is."""
    if isinstance(e, (StageFailed, StageFault)) or not is_fault(e):
        return e
    return as_stage_fault(spec, stage, output, e)
