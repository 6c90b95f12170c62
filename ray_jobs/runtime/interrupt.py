"""Ctrl-C / SIGTERM for a pipeline driver: stop within seconds, keep what is committed, say so in one line.

Ray installs its own SIGTERM handler in ``ray.init`` and Ray Train's ``fit`` keeps polling through a
KeyboardInterrupt, so a plain interrupt left training running for 40+ s (Kubernetes sends SIGTERM and
kills 30 s later). :func:`install` (called by the CLI after Ray is up) replaces both handlers: the first
signal prints ``interrupted; run again to resume``, shuts Ray down (stopping this run's actors and
workers; on a local instance also its processes), kills whatever this driver itself started and exits
130 (SIGINT) or 143 (SIGTERM). Every stage commits work atomically (shards, checkpoints) and resumes
from what is committed, so a re-run finishes the work exactly once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

MESSAGE = "interrupted; run again to resume"
SHUTDOWN_TIMEOUT_S = 15.0
_installed = False


def _stop(signum: int, _frame) -> None:
    import logging

    for name in ("ray", "ray.data", "ray.train"):  # Ray's shutdown chatter would bury the one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # threads of the stopping run (Ray Data's executor, the index writer) fail once Ray is down: the process
    # is ending, so their tracebacks would only bury the one line
    threading.excepthook = lambda _args: None
    # ray.shutdown from a signal handler can block on locks the interrupted code holds: run it on a
    # thread and give it a bounded time, then make sure nothing this driver started outlives it.
    done = threading.Event()

    def shutdown() -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            done.set()

    threading.Thread(target=shutdown, daemon=True).start()
    done.wait(SHUTDOWN_TIMEOUT_S)
    _kill_descendants()
    try:
        sys.stderr.write(f"\n{MESSAGE}\n")
        sys.stderr.flush()
    except Exception:  # a closed stderr must not keep us alive
        pass
    os._exit(128 + signum)


def _kill_descendants() -> None:
    """SIGKILL the processes this driver started (a local Ray instance's raylet, GCS and workers)."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:
        return
    for p in children:
        try:
            p.kill()
        except Exception:
            pass


def install() -> None:
    """Route SIGINT and SIGTERM to :func:`_stop` (main thread only; idempotent)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    _installed = True


def is_installed() -> bool:
    return _installed
