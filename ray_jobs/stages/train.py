"""Stage ``train``: Ray Train ``TorchTrainer`` whose workers run DeepSpeed on the adapter + segmenter.

    index tables (driver) -> per-rank Ray Datasets (load + augment, streamed, order preserved)
    -> train_loop_per_worker: DiCLIPTrainer + deepspeed.initialize -> steps
    -> every eval_every: validation (confusion matrices all-reduced), DeepSpeed checkpoint on every
       rank, ray.train.report(metrics, checkpoint) -> {train.output}/ray/...
    -> rank 0 exports adapter + segmenter (safetensors) + cache + spec to {train.output}/export
    -> rank 0's TensorBoard events (written locally) copied to {train.output}/tensorboard/ at every
       validation and at the end; the driver draws {train.output}/curves.png from metrics.jsonl

Determinism: sample ``pos`` and its crop are functions of (seed, pos); a resumed run restarts from the
checkpoint's step with the same LR (scheduler state), optimizer state and per-rank RNG, so the next
step's loss matches the uninterrupted run. The datasets are factories, rebuilt by Ray Train after a
worker failure, starting at the last registered checkpoint's step (Ray Train's run snapshot).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
import uuid

from diclip import storage
from diclip.config import JobSpec, to_dict
from diclip.errors import ConfigError, DiclipError
from diclip.logging import get_logger
from diclip.train.deepspeed_config import build_deepspeed_config, check_train_spec, per_worker_batch
from diclip.train.files import EXPORT, METRICS, PROGRESS
from ray_jobs.runtime import ray_compat
from ray_jobs.runtime.lineage import claim_settings
from ray_jobs.runtime.ray_session import configure_data_context, free_and_total, init_ray, setup_process
from ray_jobs.stages.train_runs import (  # noqa: F401  (is_complete, stale: what the registry asks a stage)
    checkpoint_uri, clear_other_run, interrupted_checkpoint, is_complete, note_recoveries, read_checkpoint_step,
    registered_step, run_settings, snapshot_uri, stale, write_curves,
)

log = get_logger("ray_jobs.stages.train")
STAGE = "train"
PREFETCH_BATCHES = 4  # batches each worker keeps loaded ahead: hides a slow object-store read behind steps


def output_uri(spec: JobSpec) -> str:
    return spec.train.output


# ----------------------------------------------------------------------------------------------
# storage for Ray Train
# ----------------------------------------------------------------------------------------------
def ray_storage(uri: str):
    """(storage_path, storage_filesystem) for RunConfig; S3 goes through our endpoint settings, and every
    call Ray Train makes to it (checkpoint uploads, its run snapshot) waits out store outages."""
    if storage.is_remote(uri):
        from diclip.storage.retrying_fs import retrying

        fs, path = storage.resolve(uri)
        return path, retrying(fs)
    return os.path.abspath(storage.local_path(uri) or uri), None


def checkpoint_from_uri(uri: str):
    from ray.train import Checkpoint

    path, fs = ray_storage(uri)
    return Checkpoint(path=path, filesystem=fs) if fs is not None else Checkpoint(path=path)


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------
def resume_step(spec: JobSpec) -> int:
    """The step the workers will resume from: Ray Train's latest registered checkpoint of this run
    (its snapshot file, read in the controller right before workers start), else ``resume_from``."""
    try:
        step = registered_step(spec)
        if step is not None:
            return step
    except (DiclipError, ValueError, TypeError, KeyError):
        log.warning("could not read %s; starting the data at the resume step", snapshot_uri(spec))
    return read_checkpoint_step(spec.train.resume_from) if spec.train.resume_from else 0


class RankDatasetFactory:
    """Builds rank ``r``'s dataset starting at the last reported step (called again after failures)."""

    def __init__(self, spec: JobSpec, items_table, rank: int):
        self.spec = spec
        self.items = items_table
        self.rank = rank

    def __call__(self):
        import ray.data

        from diclip.train.data import load_rows, rank_table

        spec, t = self.spec, self.spec.train
        setup_process(spec)
        # Runs in Ray Train's controller: the dataset captures *this* process's DataContext.
        configure_data_context(spec)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        # the loop logs steps and samples/s; one bar per rank from worker processes would only interleave
        ctx.enable_progress_bars = False
        start = resume_step(spec)
        b = per_worker_batch(spec)
        table = rank_table(self.items, self.rank, t.num_workers, b, start * t.grad_accum, t.max_iters * t.grad_accum,
                           t.seed)
        # from_items, not from_arrow: from_arrow computes block metadata in a remote task that asks for a whole
        # CPU, and with the workers placed no node may have one left (a cluster of 1-CPU nodes hung here, in
        # Ray Train's controller, before the first step); from_items builds the blocks in this process
        ds = ray.data.from_items(table.to_pylist(), override_num_blocks=max(1, math.ceil(table.num_rows / (8 * b))))
        return ds.map_batches(
            load_rows, batch_size=b, batch_format="numpy", num_cpus=0.25,
            fn_kwargs=dict(crop=spec.data.crop_size, scale_range=tuple(spec.data.rescale_range), flip=spec.data.flip,
                           seed=t.seed, with_maps=t.mode == "stored",
                           storage_options=dataclasses.asdict(storage.options_from(spec.storage))),
        )


# ----------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: a :class:`diclip.train.loop.TrainingLoop` wired to Ray Train (its rank, the
    checkpoint it restored, this rank's dataset shard, ``ray.train.report``)."""
    import ray.train
    import torch

    from diclip._compat import default_ds_accelerator
    from diclip.train.loop import TrainingLoop

    spec: JobSpec = config["spec"]
    t = spec.train
    setup_process(spec)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if t.use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.resources.num_cpus)))
    default_ds_accelerator(device.type == "cuda")
    loop = TrainingLoop(spec, rank, ctx.get_world_size(), device, fit=config.get("fit", ""))
    # A restart after a failure resumes from this run's latest checkpoint; a fresh run may resume
    # from train.resume_from (Ray Train v2 has no trainer-level resume argument).
    restarted = ray.train.get_checkpoint()
    ckpt = restarted if restarted is not None else checkpoint_from_uri(t.resume_from) if t.resume_from else None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            loop.load(d)
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = shard.iter_batches(batch_size=loop.per_worker, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES)
    loop.run(batches, lambda metrics, d: ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d)),
             restarted=restarted is not None)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def preflight(spec: JobSpec) -> None:
    """Check the inputs in the driver so a missing or mismatched artifact is one line, not N worker
    tracebacks: the cache (dimension and classes against the CLIP config) and the correlation maps."""
    import open_clip

    from diclip.data import class_set_for
    from diclip.models.clip import register_bundled_configs
    from diclip.models.kv_cache import load_cache

    register_bundled_configs()
    embed_dim = (open_clip.get_model_config(spec.model.clip.name) or {}).get("embed_dim")
    load_cache(spec.train.cache, embed_dim, list(class_set_for(spec.data).classes))
    if spec.train.mode == "stored" and not storage.is_complete(spec.train.correlation):
        raise ConfigError(f"train.correlation: no complete correlate output at {spec.train.correlation}; "
                          "run the correlate stage first (or train.mode=online)")


class TrainWatchdog:
    """Stop a training run that makes no progress for ``stall_s`` seconds, with one line naming what its
    workers ask for and what the cluster has free.

    A worker group no node can host waits forever in Ray Train (on a cluster the local resource check
    cannot see that). Progress is rank 0's ``metrics.jsonl`` growing (setup, every logged step, every
    validation); when it stops, the watchdog kills this run's controller actor (its workers and placement
    group go with it) and ``fit`` returns with an error that :func:`run` replaces by :attr:`message`.
    Committed checkpoints stay, so a re-run with a schedulable plan resumes."""

    POLL_S = 5.0

    def __init__(self, spec: JobSpec, stall_s: float):
        self.spec, self.stall_s = spec, stall_s
        self.fired = False
        self.message = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, controller) -> None:
        if self.stall_s > 0:
            self._thread = threading.Thread(target=self._watch, args=(controller,), daemon=True,
                                            name="train-watchdog")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _progress(self) -> int:
        try:
            n = storage.size(storage.join(self.spec.train.output, METRICS))
        except Exception:  # the store hiccuped: no progress seen
            return -1
        return -1 if n is None else n

    def _watch(self, controller) -> None:
        import ray

        seen, last = self._progress(), time.monotonic()
        while not self._stop.wait(min(self.POLL_S, self.stall_s)):
            now = self._progress()
            if now != seen:
                seen, last = now, time.monotonic()
            elif time.monotonic() - last > self.stall_s:
                self.message = train_stall_message(self.spec, self.stall_s / 60)
                self.fired = True
                ray.kill(controller)
                return


def train_stall_message(spec: JobSpec, minutes: float) -> str:
    t = spec.train
    want = {"CPU": t.resources.num_cpus, **({"GPU": max(1.0, t.resources.num_gpus)} if t.use_gpu else {})}
    free, total = free_and_total()
    return (f"train: no progress for {minutes:g} min; each of {t.num_workers} workers asks for {want} and the "
            f"cluster has {free or 'nothing'} free of {total or 'unknown'} - a request no node can meet (or a "
            "stuck worker); adjust train.resources / train.num_workers or the cluster, then run again "
            "(committed checkpoints are kept)")


def run(spec: JobSpec) -> dict:
    """Train (or resume an interrupted run of these settings) and commit: the manifest names the best and
    the last checkpoint and the export."""
    t = spec.train
    check_train_spec(spec)
    build_deepspeed_config(spec)  # fail fast on config errors, before any worker starts
    preflight(spec)
    init_ray(spec)
    b = per_worker_batch(spec)
    log.info("train: %d workers x %d per worker x %d accumulation = effective batch %d; lr %.2e (x%g for adapter "
             "and segmenter), %s maps, ZeRO-%d, %s", t.num_workers, b, t.grad_accum, t.num_workers * b * t.grad_accum,
             t.lr, t.lr_mult, t.mode, t.zero_stage, "GPU" if t.use_gpu else "CPU (gloo)")
    items, dropped = _items(spec)
    clear_other_run(spec)
    spec, start = _resume_point(spec)
    claim_settings(spec.train.output, STAGE, run_settings(spec))  # clear_other_run removed another run's files
    storage.write_json(storage.join(spec.train.output, PROGRESS), {"step": start})
    fit = uuid.uuid4().hex[:12]  # this driver run's id in the training log (recoveries are counted per fit)
    t0 = time.perf_counter()
    result = _fit(spec, _torch_trainer(spec, items, fit))
    seconds = time.perf_counter() - t0
    note_recoveries(spec, fit)
    return _commit(spec, result, items, dropped, seconds)


def _items(spec: JobSpec):
    """The training index and the images left out (their maps failed in correlate), within the tolerance."""
    from diclip.train.data import build_items, dropped_items, table_crops

    t = spec.train
    items = build_items(spec, spec.data.train_split, t.correlation if t.mode == "stored" else None)
    dropped = [(i, "no correlation map (failed in correlate)") for i in dropped_items(items)]
    if dropped:
        log.warning("train: %d %s images left out: their maps failed in correlate (e.g. %s)", len(dropped),
                    spec.data.train_split, dropped[0][0])
        from ray_jobs.runtime.shards import check_failures

        check_failures(STAGE, items.num_rows // max(1, table_crops(items)), dropped, t.max_failed_fraction)
    return items, dropped


def _resume_point(spec: JobSpec) -> tuple[JobSpec, int]:
    """(spec, step): an interrupted run of these settings is continued (``resume_from`` set to its latest
    checkpoint) instead of started over; ``train.resume_from`` given by the user wins."""
    t = spec.train
    if not t.resume_from:
        previous = interrupted_checkpoint(spec)
        if previous:
            spec = dataclasses.replace(spec, train=dataclasses.replace(t, resume_from=previous))
    if not spec.train.resume_from:
        return spec, 0
    start = read_checkpoint_step(spec.train.resume_from)
    log.info("train: resuming from %s at step %d", spec.train.resume_from, start)
    return spec, start


def _torch_trainer(spec: JobSpec, items, fit: str):
    """Ray Train's ``TorchTrainer`` for this run: per-rank dataset factories, the run folder on our storage,
    retries, checkpoints kept by validation mIoU."""
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = spec.train
    ctx = ray.data.DataContext.get_current()
    configure_data_context(spec)
    ctx.execution_options.preserve_order = True  # each rank's samples arrive in position order
    datasets = {f"train_{r}": RankDatasetFactory(spec, items, r) for r in range(t.num_workers)}
    path, fs = ray_storage(storage.join(t.output, "ray"))
    resources = {"CPU": t.resources.num_cpus}
    if t.use_gpu:
        resources["GPU"] = max(1.0, t.resources.num_gpus)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "fit": fit},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     placement_strategy=t.placement.upper()),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{spec.name}-train", storage_path=path, storage_filesystem=fs,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # the job log gets diclip's step lines
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="val_miou",
                                               checkpoint_score_order="max"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def _fit(spec: JobSpec, trainer):
    """``trainer.fit()`` under the stall watchdog and the driver's own interrupt handling; a worker's error
    comes back as its own class (a store outage stays a fault, a bad input a mistake)."""
    from ray_jobs.runtime import interrupt

    watchdog = TrainWatchdog(spec, 60 * spec.ray.stall_minutes)

    def controller_started(controller, ray_trains_handler) -> None:
        watchdog.start(controller)
        if not interrupt.is_installed():
            ray_trains_handler(controller)
        # else: Ray Train's own SIGINT handler "gracefully aborts", which kept training for 40+ s; the
        # driver's handler (ray_jobs.runtime.interrupt) stops within seconds and a re-run resumes.

    ray_compat.on_controller(trainer, controller_started)
    ray_compat.without_placement_group_cleaner(trainer)
    # Ray Train installs its own SIGINT handler for the run and leaves it behind: a later Ctrl-C in this
    # process (a notebook, the next stage) would ask a controller that is gone to abort. Restored after fit.
    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except Exception as e:  # Ray wraps worker errors in text; surface user errors as one line
        if watchdog.fired:
            raise DiclipError(watchdog.message) from None
        found = ray_compat.user_error_in(e, prefix="train worker: ")
        if found is not None:
            raise found from e
        raise
    finally:
        watchdog.stop()
        if main and sigint is not None:
            signal.signal(signal.SIGINT, sigint)


def _commit(spec: JobSpec, result, items, dropped: list, seconds: float) -> dict:
    """Curves, failures and the manifest (last: the commit point), and the stage's summary."""
    from diclip.storage import Manifest
    from diclip.storage.manifest import config_hash
    from diclip.train.data import table_crops

    t = spec.train
    metrics = dict(result.metrics or {})
    best = None
    if result.best_checkpoints:
        best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_miou", -1))
        best = {"path": checkpoint_uri(spec, best_ckpt.path), "val_miou": best_metrics.get("val_miou"),
                "step": best_metrics.get("step")}
    write_curves(spec)
    storage.write_failures(t.output, dropped)
    last = checkpoint_uri(spec, result.checkpoint.path if result.checkpoint else None)
    manifest = Manifest(stage=STAGE, shards=[], num_items=items.num_rows // max(1, table_crops(items)),
                        num_failed=len(dropped), config=to_dict(t), config_hash=config_hash(to_dict(t)),
                        models={"clip": spec.model.clip.name},
                        extra={"final_metrics": metrics, "best_checkpoint": best, "last_checkpoint": last,
                               "export": storage.join(t.output, EXPORT), "seconds": round(seconds, 1)})
    storage.write_manifest(t.output, manifest)
    return {"steps": t.max_iters, "val_miou": metrics.get("val_miou"), "val_cam_miou": metrics.get("val_cam_miou"),
            "loss": metrics.get("loss"), "checkpoint": last, "best_checkpoint": best, "seconds": round(seconds, 1)}
