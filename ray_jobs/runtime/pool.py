"""Fanning a stage's items out to an actor pool (Ray Data), with input tasks before it and CPU tasks after
it, gathering each item's report as it comes."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from diclip.config import Resources
from diclip.errors import DiclipError
from diclip.logging import get_logger
from diclip.storage.commit_index import ID, IndexWriter
from ray_jobs.runtime.ray_compat import streaming_executors, user_error_in
from ray_jobs.runtime.input_outages import carrying_actor, carrying_prepare
from ray_jobs.runtime.ray_session import map_batches_kwargs
from ray_jobs.runtime.watchdog import watched

log = get_logger("ray_jobs.runtime.pool")


@dataclass
class PoolResult:
    rows: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[dict] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return (self.rows + len(self.failures)) / self.seconds if self.seconds > 0 else 0.0


def run_pool(items: list[dict], actor_cls: type, ctor_kwargs: dict, res: Resources, *, desc: str,
             collect: Callable[[dict], None] | None = None, stall_s: float = 0.0, output: str | None = None,
             index_columns: Iterable[str] = (), prepare: Callable | None = None,
             prepare_kwargs: dict | None = None, finish: Callable | None = None,
             finish_kwargs: dict | None = None, finish_cpus: float = 1.0,
             finish_concurrency: int = 0) -> PoolResult:
    """Fan ``items`` (small dicts with ``item_id``) out to an actor pool; gather each call's report.

    ``actor_cls(**ctor_kwargs)`` loads models once; its ``__call__(batch)`` processes the batch, writes
    its own shard and returns one report row per item: ``item_id``, ``ok`` (bool), ``error`` (str), and
    for committed items where they were written (:func:`write_shard`), which the driver saves into the
    commit index of ``output`` as it goes. ``prepare(batch, run=<this run's id>, **prepare_kwargs)`` runs
    first in Ray Data CPU tasks (``res.prepare_cpus`` each): reading and decoding overlap the actors' model
    calls, as in Ray's batch-inference pattern. ``finish(batch, **finish_kwargs)`` runs after the pool in Ray
    Data CPU tasks (``finish_cpus`` each, at most ``finish_concurrency`` at once, 0: as many as free CPUs
    allow), ``res.batch_size`` rows per call: CPU-bound work after the model (evaluate's dense CRF) spreads
    over every CPU of the cluster, CPU-only nodes included, instead of holding the actor's GPU. The actor
    then returns that work's inputs with its rows; ``finish`` writes the shards of what it completes and
    returns report rows as an actor would, passing the actor's own reports through.
    """
    import ray.data

    result = PoolResult()
    if not items:
        return result
    if len(items) < res.concurrency:
        # no more actors or input tasks than items (a re-run with a few pending): the others would only start
        # and idle - a model load each, on a GPU - and Ray Data warns that it cannot use them
        res = replace(res, concurrency=len(items),
                      prepare_concurrency=min(res.prepare_concurrency or len(items), len(items)))
    start = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    saved_wait = ctx.wait_for_min_actors_s
    if stall_s > 0:  # actors that cannot start fail the dataset instead of waiting forever
        ctx.wait_for_min_actors_s = max(1, int(stall_s))
    try:
        ds = _pool_dataset(items, actor_cls, ctor_kwargs, res, prepare, prepare_kwargs, finish, finish_kwargs,
                           finish_cpus, finish_concurrency)
        writer = IndexWriter(output, index_columns) if output else None
        running = streaming_executors()
        try:
            _consume(ds, result, desc, res, collect if writer is None else _both(writer.add, collect), stall_s,
                     len(items), prepared=prepare is not None)
        except BaseException:
            stop_executors(streaming_executors() - running)
            raise
        finally:
            if writer is not None:
                writer.save()
    except Exception as e:
        user = user_error_in(e)
        if user is None or isinstance(e, DiclipError):
            raise
        raise type(user)(f"{desc}: {user}") from e  # e.g. a model an actor could not load: one line
    finally:
        ctx.wait_for_min_actors_s = saved_wait
    result.seconds = time.perf_counter() - start
    for item_id, err in result.failures:
        log.warning("%s: %s failed: %s", desc, item_id, err)
    return result


def _pool_dataset(items: list[dict], actor_cls: type, ctor_kwargs: dict, res: Resources, prepare: Callable | None,
                  prepare_kwargs: dict | None, finish: Callable | None, finish_kwargs: dict | None,
                  finish_cpus: float, finish_concurrency: int):
    """The pool's Ray Data plan: items -> input tasks (``prepare``) -> actor pool -> CPU tasks (``finish``)."""
    import ray.data
    from ray.data import TaskPoolStrategy

    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * res.concurrency)))
    if prepare is not None:
        # the input tasks' outages travel with their batches into the actors' reports (the recoveries record)
        prepare, actor_cls = carrying_prepare(prepare), carrying_actor(actor_cls)
        # ``run`` identifies this run to the input tasks, whose processes outlive it (per-run caches)
        ds = ds.map_batches(prepare, fn_kwargs={**(prepare_kwargs or {}), "run": uuid.uuid4().hex},
                            batch_format="pandas", batch_size=res.batch_size, num_cpus=res.prepare_cpus,
                            compute=TaskPoolStrategy(size=res.prepare_concurrency or res.concurrency),
                            **UNFUSED_TASK_ARGS)
    ds = ds.map_batches(actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_format="pandas",
                        **map_batches_kwargs(res))
    if finish is not None:
        # batches of the pool's batch size (an actor's rows, give or take a block boundary): one shard per
        # call, as the actors write; a retried task gets the same rows and rewrites the same shard
        ds = ds.map_batches(finish, fn_kwargs=finish_kwargs or {}, batch_format="pandas", batch_size=res.batch_size,
                            num_cpus=finish_cpus, compute=TaskPoolStrategy(size=finish_concurrency or None),
                            **UNFUSED_TASK_ARGS)
    return ds


def stop_executors(executors: set) -> None:
    """Stop the streaming executions a consumer gave up on (a stall, an error, an interrupt).

    The watchdog's pump thread still waits on the dataset, so without this the pool's actors - and the
    CPUs and GPUs they hold - stay alive until the driver exits, and the next pool of a long-lived driver
    (a notebook, a test session) cannot start. (A starved execution never yields its first bundle, so
    the dataset's own ``_current_executor`` handle is not set yet: the executor is found by its thread.)"""
    for executor in executors:
        try:
            executor.shutdown(force=True)
        except Exception as e:  # shutting down a failed execution: best effort, never mask the real error
            log.debug("could not stop a dataset executor: %s", e)


# Remote args of the input tasks that keep them an operator of their own: with equal resource requests (CPU
# runs) Ray Data's optimizer fuses a task map into the next actor pool's operator, and decoding would run on
# the actors again. Fusion needs equal remote args; ``max_calls=0`` is Ray's default for CPU tasks ("no
# limit"), stated explicitly so the args differ (public API, unlike the deprecated ``ray_remote_args_fn``).
UNFUSED_TASK_ARGS = {"max_calls": 0}


def _both(first: Callable[[dict], None], second: Callable[[dict], None] | None) -> Callable[[dict], None]:
    def call(row: dict) -> None:
        first(row)
        if second is not None:
            second(row)
    return call


def _consume(ds, result: PoolResult, desc: str, res: Resources, collect: Callable[[dict], None] | None,
             stall_s: float, total: int, prepared: bool = False) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", disable=not _progress_enabled(), leave=False)
    from ray_jobs.runtime import recoveries

    rec = recoveries.current()
    for batch in watched(ds.iter_batches(batch_size=None, batch_format="pandas"), desc, res, stall_s, prepared):
        if rec is not None and "store_outages" in batch:
            rec.add_store(int(batch["store_outages"].fillna(0).sum()), float(batch["store_wait_s"].fillna(0).sum()))
        for row in batch.to_dict("records"):
            if row.get("ok"):
                result.rows += 1
            else:
                result.failures.append((str(row[ID]), str(row.get("error", "unknown error"))))
            if collect is not None:
                collect(row)
            bar.update(1)
            bar.set_postfix(failed=len(result.failures))
    bar.close()


def _progress_enabled() -> bool:
    try:
        import ray.data

        return bool(ray.data.DataContext.get_current().enable_progress_bars)
    except Exception:
        return True
