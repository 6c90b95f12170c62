"""What an item's report says: one row per item, its error in one line, and the store outages the
process waited out (the stage's recoveries record)."""
from __future__ import annotations

from diclip import storage
from diclip.errors import DiclipError
from diclip.storage.commit_index import ID


def report_row(item_id: str, ok: bool, error: str = "") -> dict:
    """One item's report; it also carries the store outages this process waited out since its last report
    (the driver adds them to the stage's recoveries)."""
    outages, waited = storage.take_outages()
    return {ID: item_id, "ok": ok, "error": error, "store_outages": outages, "store_wait_s": waited}


def raise_if_outage(e: BaseException) -> None:
    """An object store away longer than ``storage.retry_budget_s`` is the stage's fault, not the item's: it is
    raised again, so the stage stops with one line and a re-run resumes, instead of the items being recorded
    as failed for good (or the stage refused for too many failures)."""
    from diclip.errors import StorageError

    if isinstance(e, StorageError) and storage.is_transient(e):
        raise e


def short_error(e: BaseException) -> str:
    raise_if_outage(e)
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def item_error(e: BaseException) -> str:
    """What a failed item's report says: a user-facing error as written, anything else (decoder, I/O
    surprises) as its type and a short message. A store outage past the budget is raised, not reported."""
    raise_if_outage(e)
    return str(e) if isinstance(e, DiclipError) else short_error(e)
