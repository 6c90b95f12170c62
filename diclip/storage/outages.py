"""Waiting out an object store that is away: which errors are an outage rather than an answer
(:func:`is_transient`), the wait with capped exponential backoff up to a budget (:func:`retry_transient`,
:func:`retry_budget`), and this process's record of the outages it waited out (said once when one begins
and once when it ends, counted for the run summary: :func:`outage_report`, :func:`take_outages`)."""
from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from diclip.logging import get_logger
from diclip.storage.options import endpoint_label, get_options

log = get_logger("diclip.storage.fs")
REASON_MAX_CHARS = 240
# Backoff between attempts of one operation while the store is away: 0.5 s doubling to 30 s, +-25% jitter
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0


def short_reason(e: BaseException) -> str:
    """The informative tail of a pyarrow/AWS error message, trimmed to one short line."""
    msg = " ".join(str(e).split())
    m = re.search(r"AWS Error [A-Z_]+ during \w+ operation: (.*)", msg)
    if m:
        msg = m.group(1)
    msg = re.sub(r"\s*\(Request ID: [^)]*\)", "", msg)
    if len(msg) > REASON_MAX_CHARS:
        msg = msg[: REASON_MAX_CHARS - 3] + "..."
    return msg or type(e).__name__


# What an object store says while it restarts, fails over or sheds load; anything else (no such key,
# access denied, a bad bucket) is an answer, not an outage.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|REQUEST_TIMEOUT|Timeout|timed out|Could not connect|Connection refused|"
    r"Connection reset|Broken pipe|INTERNAL_FAILURE|internal error|SERVICE_UNAVAILABLE|ServiceUnavailable|"
    r"Service Unavailable|SLOW_DOWN|SlowDown|Throttl|HTTP status 5\d\d|HTTP response code 5\d\d|"
    r"store unreachable for")  # the last: an operation that gave up after the budget (its text, rebuilt by Ray)


def is_transient(e: BaseException) -> bool:
    """True for errors that a store that is restarting or overloaded gives (worth waiting out)."""
    flag = getattr(e, "transient", None)  # set where diclip mapped the error; a rebuilt one has its text only
    if flag is not None:
        return bool(flag)
    return bool(_TRANSIENT.search(str(e)))


_outage_lock = threading.Lock()
# ``waiters``: operations that have failed and not yet got an answer. An outage ends when the last of them
# gets one, not when the first does: a gateway coming back answers one connection and drops the next, and
# threads in backoff retry at different moments, so "first success" would tell one restart as several.
_outage: dict[str, Any] = {"since": None, "count": 0, "waited_s": 0.0, "retries": 0, "waiters": 0,
                           "answered": False}


def outage_report() -> dict[str, float]:
    """This process's outages waited out so far: ``count``, ``waited_s`` (seconds), ``retries``."""
    with _outage_lock:
        return {k: _outage[k] for k in ("count", "waited_s", "retries")}


_taken = {"count": 0, "waited_s": 0.0}


def take_outages() -> tuple[int, float]:
    """Outages this process waited out since the last call (count, seconds): what a report row or a log
    record passes on, so each is counted once however many reports a process sends."""
    with _outage_lock:
        count, waited = _outage["count"] - _taken["count"], _outage["waited_s"] - _taken["waited_s"]
        _taken.update(count=_outage["count"], waited_s=_outage["waited_s"])
    return int(count), float(waited)


def _outage_begins(what: str, reason: str, budget: float, first: bool) -> None:
    """A transient failure; ``first``: this operation's first one (it now waits on the store)."""
    with _outage_lock:
        _outage["retries"] += 1
        _outage["waiters"] += int(first)
        if _outage["since"] is not None:
            return
        _outage["since"] = time.monotonic()
    log.warning("object store %s not answering (%s: %s); waiting up to %.0f s for it "
                "(storage.retry_budget_s)", endpoint_label(), what, reason, budget)


def _outage_waiter_done(answered: bool) -> None:
    """An operation that waited stops waiting: ``answered`` (the store replied, with data or an error)
    or not (it gave up). The outage ends with the last waiter: told as over when one was answered, and
    forgotten (the next failure is told anew) when every waiter gave up."""
    with _outage_lock:
        _outage["waiters"] = max(0, _outage["waiters"] - 1)
        _outage["answered"] = _outage["answered"] or answered
        if _outage["waiters"]:
            return
        since, answered_any = _outage["since"], _outage["answered"]
        _outage.update(since=None, answered=False)
        if since is None or not answered_any:
            return
        waited = time.monotonic() - since
        _outage["count"] += 1
        _outage["waited_s"] += waited
    log.warning("object store %s answers again after %.0f s; continuing", endpoint_label(), waited)


_budget_override = threading.local()


@contextmanager
def retry_budget(seconds: float) -> Iterator[None]:
    """Inside the block, this thread's operations wait out an outage for ``seconds`` instead of
    ``retry_budget_s``: 0 for writes that are worth less than the wait (a metrics log that the next
    write rewrites whole), so a training step never blocks on them."""
    previous = getattr(_budget_override, "seconds", None)
    _budget_override.seconds = float(seconds)
    try:
        yield
    finally:
        _budget_override.seconds = previous


def retry_transient(fn: Callable[[], Any], what: str, budget_s: float | None = None,
                    give_up: Callable[[BaseException, float, float], BaseException] | None = None) -> Any:
    """``fn()``, retried with capped exponential backoff while it fails with :func:`is_transient` errors,
    for up to ``budget_s`` seconds from the first failure (None: this thread's :func:`retry_budget`, else
    the options' ``retry_budget_s``). Other errors go through at once. When the budget is spent, raises
    ``give_up(error, waited_s, budget_s)`` (without ``give_up``, or with a budget of 0: the error
    itself). Each outage is said once when it
    begins and once when it ends, however many operations and threads wait on it."""
    if budget_s is None:
        budget_s = getattr(_budget_override, "seconds", None)
    budget = get_options().retry_budget_s if budget_s is None else budget_s
    first_failure: float | None = None
    answered = False
    delay = _BACKOFF_FIRST_S
    try:
        while True:
            try:
                out = fn()
                answered = True
                return out
            except Exception as e:
                if not is_transient(e):
                    answered = True  # the store replied: it is reachable, whatever the reply says
                    raise
                now = time.monotonic()
                waited = 0.0 if first_failure is None else now - first_failure
                left = budget - waited
                if left <= 0 or budget <= 0:
                    if give_up is None or budget <= 0:
                        raise
                    raise give_up(e, waited, budget) from e
                _outage_begins(what, short_reason(e.__cause__ or e), budget, first=first_failure is None)
                first_failure = now if first_failure is None else first_failure
                time.sleep(min(delay * random.uniform(0.75, 1.25), left))  # the last try lands on the budget
                delay = min(delay * 2, _BACKOFF_MAX_S)
    finally:
        if first_failure is not None:
            _outage_waiter_done(answered)
