"""What a stage recovered from, for its summary line and ``run-summary.json``.

A recovery that succeeds must not vanish: store outages waited out (by the driver and by the actors,
whose report rows carry them) and training worker groups restarted from a checkpoint are collected while
a stage runs and attached to its summary as ``recoveries``. The collector lives in a context variable set
around one stage (:func:`collect`), so nothing outlives the stage and code outside one records nothing.
"""
from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from diclip import storage


@dataclass
class Recoveries:
    store_outages: int = 0
    store_wait_s: float = 0.0
    resumed_from: list[int] = field(default_factory=list)  # training: the step each worker-group restart resumed at
    nodes_lost: list[str] = field(default_factory=list)  # addresses of nodes alive at the start and gone at the end

    def add_store(self, count: int, seconds: float) -> None:
        self.store_outages += int(count)
        self.store_wait_s += float(seconds)

    def __bool__(self) -> bool:
        return bool(self.store_outages or self.resumed_from or self.nodes_lost)

    def as_dict(self) -> dict:
        out: dict = {}
        if self.store_outages:
            out["store_outages"] = self.store_outages
            out["store_wait_s"] = round(self.store_wait_s, 1)
        if self.resumed_from:
            out["worker_group_restarts"] = len(self.resumed_from)
            out["resumed_from_steps"] = list(self.resumed_from)
        if self.nodes_lost:
            out["nodes_lost"] = list(self.nodes_lost)
        return out

    def line(self) -> str:
        """One line, e.g. ``store away 2x (waited 14 s), worker group restarted 1x (resumed from step 4)``."""
        parts = []
        if self.nodes_lost:
            parts.append(f"{len(self.nodes_lost)} node(s) lost ({', '.join(self.nodes_lost)}), their work redone")
        if self.store_outages:
            parts.append(f"store away {self.store_outages}x (waited {self.store_wait_s:.0f} s in all)")
        if self.resumed_from:
            steps = ", ".join(str(s) for s in self.resumed_from)
            parts.append(f"worker group restarted {len(self.resumed_from)}x (resumed from step {steps})")
        return ", ".join(parts)


_current: contextvars.ContextVar[Recoveries | None] = contextvars.ContextVar("diclip_recoveries", default=None)


@contextmanager
def collect() -> Iterator[Recoveries]:
    """Collect one stage's recoveries; the driver's own outages are taken at the end."""
    rec = Recoveries()
    storage.take_outages()  # what happened before this stage belongs to no stage
    before = _alive_nodes()
    token = _current.set(rec)
    try:
        yield rec
    finally:
        rec.add_store(*storage.take_outages())
        now = _alive_nodes()
        rec.nodes_lost = sorted(address for node_id, address in before.items() if node_id not in now)
        _current.reset(token)


def _alive_nodes() -> dict[str, str]:
    """node id -> address of the connected cluster's alive nodes ({} without Ray: a local stage)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    try:
        return {n["NodeID"]: n.get("NodeManagerAddress", n["NodeID"][:8]) for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001 - a record, never a reason to fail a stage
        return {}


def current() -> Recoveries | None:
    """The running stage's collector (None outside a stage)."""
    return _current.get()
