"""The stall watchdog of a stage's actor pool: a pool that makes no progress for ``ray.stall_minutes``
stops with one line saying what the cluster cannot give it, instead of hanging."""
from __future__ import annotations

import time
from typing import Callable, Iterator

from diclip.config import Resources
from diclip.errors import DiclipError
from ray_jobs.runtime.ray_compat import is_actor_start_timeout
from ray_jobs.runtime.ray_session import free_and_total, largest_node


def stall_message(desc: str, res: Resources, minutes: float, prepared: bool = False) -> str:
    """Why a stage may have stopped moving, from what its pool asks for against what the cluster has.

    Three different stalls: a pool the cluster cannot hold (waits for nodes that may never come), a pool
    that holds the CPUs its own input tasks (``prepared``) need, and neither (a stuck actor or call)."""
    want = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
    pool = {k: v * res.concurrency for k, v in want.items()}
    free, total = free_and_total()
    node = largest_node()
    head = (f"{desc}: no progress for {minutes:g} min; each of {res.concurrency} actors asks for {want} and the "
            f"cluster has {free or 'nothing'} free of {total or 'unknown'}")
    tail = "then run again (work done is kept)"
    if node and any(v > node.get(k, 0.0) for k, v in want.items()):
        return (f"{head} - one actor needs more than the cluster's largest node has ({node}), a request no node "
                f"can meet (unless an autoscaler adds bigger nodes); adjust {desc}.resources or the cluster, {tail}")
    if total and any(v > total.get(k, 0.0) for k, v in pool.items()):
        return (f"{head} - the fixed-size pool needs {pool} in all, more than the cluster has (unless an "
                f"autoscaler adds nodes); lower {desc}.resources.concurrency or grow the cluster, {tail}")
    if prepared and total and free.get("CPU", 0.0) < res.prepare_cpus:
        return (f"{head} - the actors hold the CPUs, so their input tasks ({res.prepare_cpus:g} CPUs each) get "
                f"none and no input reaches the actors; lower {desc}.resources.concurrency, num_cpus or "
                f"prepare_cpus, or add CPUs, {tail}")
    return (f"{head} - the requests fit, so an actor or a call may be stuck (or one batch takes longer than "
            f"that); check the actors' logs, or raise ray.stall_minutes, {tail}")


clock: Callable[[], float] = time.monotonic


"""The stall watchdog's clock (tests run it fast once a pool's actors are up, instead of waiting in real time)."""


def watched(batches: Iterator, desc: str, res: Resources, stall_s: float, prepared: bool = False) -> Iterator:
    """Yield from ``batches`` (consumed on a thread), raising a one-line :class:`DiclipError` when nothing
    arrives for ``stall_s`` seconds - a request no node can meet, or input tasks starved of CPUs by their
    own actor pool (``prepared``: the pool has input tasks), otherwise wait forever, silently."""
    import queue
    import threading

    if not stall_s or stall_s <= 0:
        yield from batches
        return
    q: queue.Queue = queue.Queue(maxsize=4)
    end = object()

    def pump() -> None:
        try:
            for b in batches:
                q.put(b)
            q.put(end)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    threading.Thread(target=pump, daemon=True, name=f"{desc}-batches").start()
    last = clock()
    # Before the first batch Ray Data's own actor-start timeout (set by run_pool to stall_s) should fire
    # first: it stops its executor cleanly, where this watchdog can only walk away from it.
    limit = 2 * stall_s
    while True:
        try:
            b = q.get(timeout=min(5.0, stall_s))
        except queue.Empty:
            if clock() - last > limit:
                raise DiclipError(stall_message(desc, res, limit / 60, prepared)) from None
            continue
        if b is end:
            return
        if isinstance(b, BaseException):
            if is_actor_start_timeout(b):
                raise DiclipError(stall_message(desc, res, stall_s / 60, prepared)) from None
            raise b
        last, limit = clock(), stall_s
        yield b
