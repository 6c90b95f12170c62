"""The skeleton every actor-pool stage shares, once: claim the settings, find what is still to do, start or
join Ray, fan the pending items out to the pool, and - after the stage's own summary - commit and report.

A stage module keeps only what is particular to it: its item list, its actor (and input step), what it
adds to the manifest and its picture. ``generate``, ``mask``, ``cache``, ``correlate``, ``evaluate`` and
``infer`` run through it::

    run = start(spec, POOL, spec.mask, list_items(spec), settings(spec))   # claim, pending, Ray, pool
    manifest = run.commit(spec, models, extra)                              # dedupe, failures, manifest
    return run.summary(manifest, "masked_now", kept=...)                    # the stage's result dict
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from diclip.config import JobSpec
from diclip.logging import get_logger
from diclip.storage import Manifest
from ray_jobs.runtime.pool import PoolResult, run_pool
from ray_jobs.runtime.shards import finalize, pending_items
from ray_jobs.runtime.ray_session import init_ray
from ray_jobs.runtime.lineage import claim_settings


@dataclass(frozen=True)
class PoolStage:
    """What a pool stage is, beyond the skeleton: its name, what one item is called and what the pool does
    to it (for the start line), its actor and optional input step (``run_pool``'s ``prepare``)."""

    name: str
    noun: str  # "generated images", "maps", "kept masks"
    verb: str  # "mask", "extract", "featurise"
    actor: type
    prepare: Callable | None = None
    index_columns: tuple[str, ...] = ()
    desc: str = ""  # the progress and log label, when not the stage name


@dataclass
class PoolRun:
    """One run of a pool stage: what it found, what the pool did, and the settings hash it claimed."""

    stage: PoolStage
    section: Any
    items: list[dict]
    pending: list[dict]
    settings_hash: str
    result: PoolResult = field(default_factory=PoolResult)
    started: float = field(default_factory=time.perf_counter)

    def commit(self, spec: JobSpec, models: dict[str, str], extra: dict | None = None,
               failures: Iterable[tuple[str, str]] = (), before_commit: Callable[[], None] | None = None) -> Manifest:
        """Dedupe the shards, write the failures (``failures`` the stage found itself, then the pool's) and the
        manifest, last: the commit point. Too many failures, or ``before_commit`` raising, leave the stage
        incomplete."""
        return finalize(self.section.output, self.stage.name, spec, self.section,
                        [*failures, *self.result.failures], models, extra, before_commit=before_commit,
                        index_columns=self.stage.index_columns)

    def summary(self, manifest: Manifest, now_key: str, **more: Any) -> dict:
        """The stage's result: committed and failed items, what this run did (``now_key``), its rate."""
        rate = self.result.items_per_s
        return {"images": manifest.num_items, **more, "failed": manifest.num_failed, now_key: self.result.rows,
                "images_per_s": round(rate, 3), "seconds": round(time.perf_counter() - self.started, 1)}


def start(spec: JobSpec, stage: PoolStage, section: Any, items: list[dict], settings: dict[str, Any], *,
          ctor_kwargs: dict | None = None, prepare_kwargs: dict | None = None, detail: str = "",
          pending: Callable[[list[dict]], list[dict]] | None = None, also_drop: Iterable[str] = (),
          **pool_kwargs: Any) -> PoolRun:
    """Claim ``settings`` (rows made with others are dropped first, never mixed in, with the folders in
    ``also_drop``), find the pending items (``pending(items)`` when the stage decides itself, asked after
    the claim), and run them through the stage's actor pool (``pool_kwargs``: ``run_pool``'s ``collect`` and
    ``finish`` options, for a stage that gathers report rows or runs CPU tasks after its actors).

    Ray is started or joined only when something is pending: a complete stage re-run touches no cluster."""
    s_hash = claim_settings(section.output, stage.name, settings, also_drop=also_drop)
    todo = pending_items(items, section.output) if pending is None else pending(items)
    res = section.resources
    log_for(stage).info("%s: %d %s%s, %d already committed, %d to %s (%d actors x batch %d, %s)", stage.name,
                        len(items), stage.noun, detail, len(items) - len(todo), len(todo), stage.verb,
                        res.concurrency, res.batch_size, "GPU" if res.num_gpus else "CPU")
    run = PoolRun(stage, section, items, todo, s_hash)
    if todo:
        init_ray(spec)
    run.result = run_pool(todo, stage.actor, ctor_kwargs if ctor_kwargs is not None else {"spec": spec}, res,
                          desc=stage.desc or stage.name, stall_s=60 * spec.ray.stall_minutes,
                          output=section.output, index_columns=stage.index_columns, prepare=stage.prepare,
                          prepare_kwargs=prepare_kwargs, **pool_kwargs)
    return run


def log_for(stage: PoolStage):
    """The stage module's own logger (its lines keep the module's name, as before the template)."""
    return get_logger(f"ray_jobs.stages.{stage.name}")
