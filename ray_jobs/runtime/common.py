"""What every Ray stage shares: Ray start-up, per-actor setup, atomic shards, resume and manifests.

Artifact convention (DESIGN section 5): ``{stage_uri}/shards/part-*.parquet`` data shards,
``failures.parquet`` (item_id, error) and ``manifest.json`` written last; a stage is complete exactly
when its manifest exists.

Exactly-once under kills and retries:

* each actor call writes **one** shard for its batch, named by a hash of the batch's item ids, with an
  atomic write - a retried batch overwrites the same object, a killed actor leaves nothing visible;
* the call's reports say where each item went; the driver keeps that as the stage's commit index
  (:mod:`diclip.storage.commit_index`), so a (re-)run reads one index instead of every shard and only
  schedules items it does not name;
* :func:`finalize` drops rows whose item id already lives in another shard (possible only if a killed
  run and its re-run batched the same item differently), then writes the compact index, failures and
  manifest.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

import diclip
from diclip import storage
from diclip.config import JobSpec, Resources, to_dict
from diclip.errors import DiclipError
from diclip.logging import get_logger, init_logging, quiet_library_logs
from diclip.storage import Manifest, ShardInfo
from diclip.storage.manifest import config_hash
from diclip.storage.commit_index import ID, INDEX_FILE, SHARD_DIR, CommitIndex, IndexWriter, annotate, relative
from ray_jobs.runtime.ray_compat import is_actor_start_timeout, streaming_executors, user_error_in
from ray_jobs.runtime.input_outages import carrying_actor, carrying_prepare

log = get_logger("ray_jobs.runtime.common")


# ----------------------------------------------------------------------------------------------
# Ray and per-process setup
# ----------------------------------------------------------------------------------------------
def worker_env(spec: JobSpec) -> dict[str, str]:
    """Environment every Ray worker needs (credentials stay in the user's environment, never the spec)."""
    env = {
        "DICLIP_LOG_LEVEL": os.environ.get("DICLIP_LOG_LEVEL", "INFO"),
        "TOKENIZERS_PARALLELISM": "false",
        # libraries' notices to their own developers (Ray Train's use of a deprecated Ray Data option,
        # DeepSpeed's of a deprecated torch.distributed call) are not the job's news; tests check diclip's own
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning"),
    }
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_EC2_METADATA_DISABLED", "HF_HOME",
                "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    if spec.storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = spec.storage.endpoint_url
    if env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3"):
        # an S3-compatible store has no EC2 metadata service to probe; on AWS the probe finds the
        # instance-profile credentials (cluster/README.md), so it is left on there
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return env


DASHBOARD_SCHEMES = ("http://", "https://")


def drop_dashboard_address() -> str | None:
    """Remove an exported ``RAY_ADDRESS=http://HOST:8265`` from this process's environment; return it.

    That address is the Jobs API (what ``diclip submit/status/logs`` use), not a cluster ``ray.init`` can
    join: Ray refuses it ("Invalid Ray address"). ``diclip run`` outside a submitted job therefore ignores
    it and starts (or joins) Ray as the spec says; ``ray.address`` joins a cluster explicitly."""
    address = os.environ.get("RAY_ADDRESS", "")
    if os.environ.get("RAY_JOB_ID") or not address.startswith(DASHBOARD_SCHEMES):
        return None
    del os.environ["RAY_ADDRESS"]
    return address


def init_ray(spec: JobSpec) -> None:
    """Start or join Ray as the spec says; no-op when this process is already connected.

    Inside a submitted Ray job (``RAY_JOB_ID`` set) the driver joins the job's cluster and inherits
    its runtime env; passing resources or env vars again there is refused by Ray.
    """
    import ray

    if ray.is_initialized():
        return
    dashboard = drop_dashboard_address()
    if dashboard:
        log.info("note: ignoring RAY_ADDRESS=%s (a dashboard address, for diclip submit/status/logs); this run "
                 "uses %s", dashboard, f"ray.address={spec.ray.address}" if spec.ray.address else "a local Ray")
    in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    if spec.ray.address or in_job:
        ray.init(address=spec.ray.address or "auto", log_to_driver=True)
    else:
        # RAY_BACKEND_LOG_LEVEL stays as the user has it: set to any level, every Ray worker process prints
        # "logging.cc: Set ray log level from environment variable" when it starts (14 lines in a 2-worker
        # training run, measured), where unset the C++ core prints one harmless line per restartable actor
        env = worker_env(spec)
        kwargs: dict[str, Any] = {"log_to_driver": True, "include_dashboard": bool(spec.ray.dashboard)}
        if spec.ray.dashboard:
            # Address our own instance explicitly: Ray Train's placement-group cleaner queries the State
            # API, which otherwise auto-detects "the" local Ray and fails when another instance runs on
            # this host ("Found multiple active Ray instances").
            port = free_port()
            kwargs["dashboard_port"] = port
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs["runtime_env"] = {"env_vars": env}
        if spec.ray.num_cpus:
            kwargs["num_cpus"] = spec.ray.num_cpus
        ray.init(**kwargs)
    configure_data_context(spec)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configure_data_context(spec: JobSpec) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = spec.ray.show_progress()
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def setup_process(spec: JobSpec) -> None:
    """Per-actor/worker setup: logging, storage endpoint, CPU threads."""
    init_logging()
    quiet_library_logs()
    storage.configure(storage.options_from(spec.storage))


def configure_driver(spec: JobSpec) -> None:
    setup_process(spec)


def actor_device(res: Resources) -> str:
    import torch

    return "cuda" if res.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def start_actor(spec: JobSpec, res: Resources) -> str:
    """Actor constructor preamble: process setup, the device its resources ask for, and torch threads
    matching the CPUs Ray reserved for it (more would oversubscribe the node). Returns the device."""
    import torch

    setup_process(spec)
    device = actor_device(res)
    torch.set_num_threads(max(1, int(res.num_cpus)))
    return device


def map_batches_kwargs(res: Resources) -> dict[str, Any]:
    """Ray Data actor-pool arguments from a stage's resources.

    GPU stages need an explicit batch size (Ray refuses the CPU default), and ``num_gpus`` must stay
    None (not 0) on CPU stages or Ray treats them as GPU stages.
    """
    from ray.data import ActorPoolStrategy

    kw: dict[str, Any] = {"batch_size": res.batch_size, "compute": ActorPoolStrategy(size=res.concurrency),
                          "num_cpus": res.num_cpus}
    if res.num_gpus > 0:
        kw["num_gpus"] = res.num_gpus
    return kw


# ----------------------------------------------------------------------------------------------
# shards, resume, failures, manifest
# ----------------------------------------------------------------------------------------------
def shard_uri(stage_uri: str, ids: Iterable[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:20]
    return storage.join(stage_uri, SHARD_DIR, f"part-{digest}.parquet")


def write_shard(stage_uri: str, table: pa.Table, row_group_size: int | None = None,
                reports: list[dict] | None = None, index_columns: Iterable[str] = ()) -> str:
    """Atomically write one batch's rows (must include ``item_id``); returns the shard URI.

    ``reports`` (the call's report rows) learn where each committed item now lives, for the driver's
    commit index (:mod:`diclip.storage.commit_index`)."""
    if table.num_rows == 0:
        return ""
    uri = shard_uri(stage_uri, table.column(ID).to_pylist())
    storage.write_parquet(uri, table, row_group_size=row_group_size)
    if reports is not None:
        annotate(reports, relative(stage_uri, uri), table, index_columns)
    return uri


def list_shards(stage_uri: str) -> list[str]:
    return storage.list_files(storage.join(stage_uri, SHARD_DIR), suffix=".parquet")


def committed_ids(stage_uri: str) -> dict[str, str]:
    """item id -> shard URI for every row already committed (first shard wins), from the commit index."""
    index = CommitIndex.load(stage_uri)
    return {i: index.shard_uri(i) for i in index.entries}


def pending_items(items: list[dict], stage_uri: str) -> list[dict]:
    """The items not yet in a committed shard of ``stage_uri`` (resume skips the rest)."""
    return CommitIndex.load(stage_uri).pending(items)


def failure_reasons(failures: list[tuple[str, str]], top: int = 3) -> list[tuple[str, int]]:
    """The most common failure reasons with counts; item ids and numbers are masked so that the same
    problem on different items counts as one reason."""
    import re
    from collections import Counter

    def reason(item_id: str, error: str) -> str:
        text = error
        for name in {item_id, item_id.rsplit("/", 1)[-1]} - {""}:  # "seg/<id>" tasks name files by <id>
            text = text.replace(name, "<item>")
        text = re.sub(r"\S*<item>\S*", "<item>", text)
        return re.sub(r"\d+", "N", text)[:160]

    return Counter(reason(i, e) for i, e in failures).most_common(top)


def check_failures(stage: str, committed: int, failures: list[tuple[str, str]], max_fraction: float) -> None:
    """Raise :class:`StageFailed` (one line, top reasons with counts) when too many items failed."""
    from diclip.errors import StageFailed

    total = committed + len(failures)
    if not failures or total == 0 or len(failures) / total <= max_fraction:
        return
    top = "; ".join(f"{n}x {r}" for r, n in failure_reasons(failures))
    raise StageFailed(f"{stage}: {len(failures)} of {total} items failed ({100 * len(failures) / total:.0f}% > "
                      f"max_failed_fraction {100 * max_fraction:g}%), so the stage is not complete (no manifest); "
                      f"top reasons: {top}")


def finalize(stage_uri: str, stage: str, spec: JobSpec, section: Any, failures: list[tuple[str, str]],
             models: dict[str, str] | None = None, extra: dict | None = None,
             before_commit: Callable[[], None] | None = None, index_columns: Iterable[str] = ()) -> Manifest:
    """Dedupe shards, write ``failures.parquet`` then ``manifest.json`` (last: the commit point).

    More failures than the stage's ``max_failed_fraction`` write the failures but no manifest and
    raise :class:`~diclip.errors.StageFailed`: the stage stays incomplete and exits non-zero.
    ``before_commit`` is a stage's own last check (e.g. an export's completeness); raising there
    leaves the stage incomplete the same way."""
    index = CommitIndex.load(stage_uri, index_columns)
    shards = [ShardInfo(path=rel, rows=n) for rel, n in index.dedupe().items()]
    index.save_compact()
    storage.write_failures(stage_uri, failures)
    check_failures(stage, sum(s.rows for s in shards), failures, getattr(section, "max_failed_fraction", 1.0))
    if before_commit is not None:
        before_commit()
    cfg = to_dict(section)
    manifest = Manifest(
        stage=stage,
        shards=shards,
        num_items=sum(s.rows for s in shards),
        num_failed=len(failures),
        config=cfg,
        config_hash=config_hash(cfg),
        package_version=diclip.__version__,
        models=models or {},
        extra={**(extra or {}), "commit_index": INDEX_FILE},
    )
    storage.write_manifest(stage_uri, manifest)
    return manifest


def read_stage_table(stage_uri: str, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a complete stage, via its manifest."""
    manifest = storage.read_manifest(stage_uri)
    if manifest is None:
        from diclip.errors import StorageError

        raise StorageError(f"stage output {stage_uri} is not complete (no manifest.json); run that stage first")
    tables = [storage.read_parquet(storage.join(stage_uri, s.path), columns=columns) for s in manifest.shards]
    if not tables:
        return pa.table({ID: pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default")


# ----------------------------------------------------------------------------------------------
# running an actor pool over items
# ----------------------------------------------------------------------------------------------
@dataclass
class PoolResult:
    rows: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[dict] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return (self.rows + len(self.failures)) / self.seconds if self.seconds > 0 else 0.0


def free_and_total() -> tuple[dict, dict]:
    """The cluster's free and total CPUs/GPUs, for messages ({} when Ray cannot say: a message must not fail)."""
    try:
        import ray

        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    except Exception:
        return {}, {}
    return free, total


def alive_node_records() -> list[dict]:
    """``ray.nodes()`` records of the connected cluster's alive nodes."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_resources(node: dict) -> dict:
    """Total CPUs/GPUs of one ``ray.nodes()`` record."""
    return {k: float(node.get("Resources", {}).get(k, 0.0)) for k in ("CPU", "GPU")}


def alive_nodes() -> list[dict]:
    """Total CPUs/GPUs of each alive node of the connected cluster."""
    return [node_resources(n) for n in alive_node_records()]


def largest_node() -> dict:
    """CPUs/GPUs of the biggest alive node, for messages ({} when Ray cannot say)."""
    try:
        nodes = alive_nodes()
    except Exception:
        return {}
    return {k: max(n[k] for n in nodes) for k in ("CPU", "GPU")} if nodes else {}


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

    from diclip.errors import DiclipError

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
    from ray.data import TaskPoolStrategy

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
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * res.concurrency)))
        if prepare is not None:
            # the input tasks' outages travel with their batches into the actors' reports (the recoveries record)
            prepare, actor_cls = carrying_prepare(prepare), carrying_actor(actor_cls)
            # ``run`` identifies this run to the input tasks, whose processes outlive it (per-run caches)
            ds = ds.map_batches(prepare, fn_kwargs={**(prepare_kwargs or {}), "run": uuid.uuid4().hex},
                                batch_format="pandas",
                                batch_size=res.batch_size, num_cpus=res.prepare_cpus,
                                compute=TaskPoolStrategy(size=res.prepare_concurrency or res.concurrency),
                                **UNFUSED_TASK_ARGS)
        ds = ds.map_batches(actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_format="pandas",
                            **map_batches_kwargs(res))
        if finish is not None:
            # batches of the pool's batch size (an actor's rows, give or take a block boundary): one shard per
            # call, as the actors write; a retried task gets the same rows and rewrites the same shard
            ds = ds.map_batches(finish, fn_kwargs=finish_kwargs or {}, batch_format="pandas",
                                batch_size=res.batch_size,
                                num_cpus=finish_cpus, compute=TaskPoolStrategy(size=finish_concurrency or None),
                                **UNFUSED_TASK_ARGS)
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
