"""The pieces a training worker is made of, each with one job (torchtitan-style):

* :func:`build_engine` - DeepSpeed around the trainable heads only, with the poly-warmup schedule;
* :class:`RankBatches` - this rank's batches in position order (checks the stream starts where it should);
* :func:`train_step` - one optimizer step (gradient accumulation over micro-batches);
* :class:`StepMetrics` - running losses, all-reduced means, samples/s, the ``metrics.jsonl`` log;
* :class:`Checkpointer` - DeepSpeed state + per-rank RNG + step, saved to and restored from a directory;
* :func:`validate` - segmentation and CAM mIoU on the val split with confusion matrices summed over ranks;
* :class:`TensorBoardLog` - rank 0's event files (scalars, prediction pictures), copied to the train output.

None of them knows about Ray: ``ray_jobs/stages/train.py`` wires them into a Ray Train worker loop (reports,
checkpoint upload, dataset shards), so each can be tested and reused on its own.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from diclip import storage
from diclip.config import JobSpec
from diclip.logging import get_logger
from diclip.train.files import METRICS, STATE, TENSORBOARD

log = get_logger("diclip.train")
DS_TAG = "ds"
TB_PICTURE_CELL = 128  # px per picture cell in TensorBoard: legible masks, a few kB per validation


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------------------------
# engine
# ----------------------------------------------------------------------------------------------
def build_engine(trainer, spec: JobSpec, device: torch.device):
    """(engine, optimizer) with only ``trainer.model.heads`` inside DeepSpeed: its precision must not
    touch the frozen CLIP. Checkpoints are read weights-only (:mod:`diclip.train.safe_checkpoint`)."""
    from diclip._compat import default_ds_accelerator, skip_unused_deepspeed_ops

    default_ds_accelerator(device.type == "cuda")  # before deepspeed is imported
    import deepspeed

    if device.type == "cpu":  # a fresh node starts training in seconds, not after a compile
        skip_unused_deepspeed_ops()

    from diclip.method.schedule import poly_warmup_multiplier
    from diclip.train.deepspeed_config import build_deepspeed_config
    from diclip.train.safe_checkpoint import install as install_weights_only_loading

    t = spec.train

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: poly_warmup_multiplier(s, t.max_iters, t.warmup_iters, t.warmup_ratio, t.power))

    engine, optimizer, _, _ = deepspeed.initialize(
        model=trainer.model.heads, model_parameters=trainer.param_groups(),
        config=build_deepspeed_config(spec, use_gpu=device.type == "cuda"), lr_scheduler=schedule,
        dist_init_required=False)
    install_weights_only_loading(engine, trust=t.trust_checkpoints)
    return engine, optimizer


def precision_report(trainer, engine) -> dict:
    """Which dtype each model really runs in (only the trainable heads carry DeepSpeed's precision)."""
    diffusion = trainer.diffusion.dtype if trainer.diffusion is not None else None
    return {"precision": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
            "dtype_trainable": str(engine.module.dtype).replace("torch.", ""),
            "dtype_clip": str(next(trainer.clip.model.parameters()).dtype).replace("torch.", ""),
            "dtype_diffusion": str(diffusion).replace("torch.", "") if diffusion is not None else None}


# ----------------------------------------------------------------------------------------------
# data and one step
# ----------------------------------------------------------------------------------------------
class RankBatches:
    """This rank's batches: micro-step ``m`` holds positions ``m * G + rank * b ...`` (G = b * world)."""

    def __init__(self, batches: Iterator[dict], rank: int, world: int, per_worker: int):
        self.it = iter(batches)
        self.rank, self.b, self.g = rank, per_worker, per_worker * world

    def rows(self, micro: int) -> dict:
        want = micro * self.g + self.rank * self.b
        while True:
            rows = next(self.it)
            first = int(rows["pos"][0])
            if first == want:
                return rows
            if first > want:
                raise RuntimeError(f"rank {self.rank}: data starts at position {first}, expected {want}")


def train_step(engine, trainer, batches: RankBatches, step: int, grad_accum: int, device) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's mean losses."""
    from diclip.train.trainer import batch_from_rows

    out: dict[str, float] = {}
    for m in range(grad_accum):
        batch = batch_from_rows(batches.rows(step * grad_accum + m), device)
        losses = trainer.losses(batch, step, heads=engine)
        engine.backward(losses["loss"])
        engine.step()
        for k, v in losses.items():
            out[k] = out.get(k, 0.0) + float(v.detach()) / grad_accum
    return out


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
class StepMetrics:
    """Running per-step losses -> all-reduced means every ``log_every`` steps, plus the JSONL log (rank 0).

    The log holds each step once: a run resumed from a checkpoint at step ``start`` keeps the records up to
    it, drops what the failed attempt logged after it (those steps run again) and notes the resume. Rank 0
    keeps the log's lines in memory and rewrites the file whole, best effort: a store outage delays the
    log (the next write carries every line) but never stops training."""

    def __init__(self, spec: JobSpec, rank: int, world: int, samples_per_step: int, start: int = 0, fit: str = ""):
        self.uri = storage.join(spec.train.output, METRICS)
        self.fit = fit  # which `fit` (driver run) a record belongs to: a restart within it is a recovery
        self.rank, self.world = rank, world
        self.samples_per_step = samples_per_step
        self.running: dict[str, float] = {}
        self.steps = 0
        self.t_last = time.perf_counter()
        self.lines: list[str] = []
        if rank == 0 and start > 0 and storage.exists(self.uri):
            self.lines = kept_records(storage.read_text(self.uri), start)

    def add(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.running[k] = self.running.get(k, 0.0) + v
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """Means over the steps since the last flush, averaged over ranks, and samples/s."""
        names = sorted(self.running)
        vals = torch.tensor([self.running[k] / max(1, self.steps) for k in names], dtype=torch.float64)
        if _distributed():
            dist.all_reduce(vals)
            vals /= self.world
        out = dict(zip(names, vals.tolist()))
        now = time.perf_counter()
        out["samples_per_s"] = max(1, self.steps) * self.samples_per_step / max(1e-9, now - self.t_last)
        self.running, self.steps, self.t_last = {}, 0, now
        return out

    def record(self, kind: str, metrics: dict) -> None:
        if self.rank == 0:
            outages, waited = storage.take_outages()  # a recovery goes on record (the run summary counts them)
            extra = {"store_outages": outages, "store_wait_s": round(waited, 1)} if outages else {}
            if self.fit:
                extra["fit"] = self.fit
            self.lines.append(json.dumps({"kind": kind, **metrics, **extra}, default=float))
            best_effort(f"training log {self.uri}", lambda: storage.write_text(self.uri, "\n".join(self.lines) + "\n"))


    def logged_in_this_fit(self) -> bool:
        """Whether an earlier attempt of this fit logged anything: then this worker group is a restart."""
        return bool(self.fit) and any(f'"fit": "{self.fit}"' in line for line in self.lines)


def kept_records(text: str, start: int) -> list[str]:
    """The lines of a metrics log that a run resumed at step ``start`` keeps: everything up to that step
    (setup and earlier resume records included); a line cut short by a crash is dropped."""
    kept = []
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if int(r.get("step", 0)) <= start:
            kept.append(line)
    return kept


def best_effort(what: str, write) -> bool:
    """Run a non-essential write without waiting out an outage; a failure is one warning per thing, and
    the run goes on (the next write of ``what`` carries everything)."""
    from diclip.errors import StorageError
    from diclip.logging import warn_once

    try:
        with storage.retry_budget(0):
            write()
        return True
    except StorageError as e:
        warn_once(log, f"{what} not written now ({e}); training goes on and writes it again later")
        return False


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class Checkpointer:
    """DeepSpeed state (every rank's ZeRO shard), each rank's RNG, and the step (rank 0) in one directory."""

    def __init__(self, rank: int, world: int, seed: int):
        self.rank, self.world, self.seed = rank, world, seed

    @contextmanager
    def saved(self, engine, step: int, metrics: dict) -> Iterator[str]:
        """A temporary directory holding this rank's part of the checkpoint (every rank must call it:
        DeepSpeed's save is a collective); removed on exit, after the caller has uploaded it."""
        import shutil
        import tempfile

        from safetensors.torch import save_file

        tmp = tempfile.mkdtemp(prefix=f"diclip-ckpt-{self.rank}-")
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
            save_file({"cpu": torch.get_rng_state()}, os.path.join(tmp, f"rng_rank{self.rank}.safetensors"))
            if self.rank == 0:
                with open(os.path.join(tmp, STATE), "w") as f:
                    json.dump({"step": step, "seed": self.seed, "world": self.world, "metrics": metrics}, f,
                              default=float)
            if _distributed():
                dist.barrier()
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, engine, directory: str) -> int:
        """Restore from a checkpoint directory; returns the step to continue from."""
        from safetensors.torch import load_file

        engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False)
        with open(os.path.join(directory, STATE)) as f:
            step = int(json.load(f)["step"])
        rng = os.path.join(directory, f"rng_rank{self.rank}.safetensors")
        if os.path.exists(rng):
            torch.set_rng_state(load_file(rng)["cpu"])
        if _distributed():
            dist.barrier()  # keep the directory alive until every rank has read it
        return step


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def validate(trainer, spec: JobSpec, rank: int, world: int, step: int, store) -> dict[str, Any]:
    """Seg and CAM mIoU on the val split, confusion matrices summed over ranks (exact).

    Images whose maps failed in ``correlate`` or that have no mask are skipped and counted."""
    from diclip.data import open_split
    from diclip.method import metrics as metriclib

    ds = open_split(spec.data, spec.data.val_split)
    ids = ds.ids[: spec.train.val_limit] if spec.train.val_limit else ds.ids
    k = trainer.class_set.num_classes
    cms = np.zeros((2, k, k), dtype=np.int64)
    used = 0
    for _, sample, rec in _val_samples(ds, ids[rank::world], store):
        seg, cam = trainer.validate_sample(sample.image, sample.mask, sample.label, rec, step)
        cms[0] += seg
        cms[1] += cam
        used += 1
    t = torch.from_numpy(cms)
    n = torch.tensor([used], dtype=torch.int64)
    if _distributed():
        dist.all_reduce(t)
        dist.all_reduce(n)
    seg_s = metriclib.summarize(t[0].numpy(), trainer.class_set.classes)
    cam_s = metriclib.summarize(t[1].numpy(), trainer.class_set.classes)
    return {"val_miou": seg_s["miou"], "val_cam_miou": cam_s["miou"], "val_pixel_acc": seg_s["pixel_accuracy"],
            "val_images": int(n.item()), "val_images_skipped": len(ids) - int(n.item())}


def _val_samples(ds, ids, store):
    """(id, sample, map record or None) for the validation images that have maps (when stored) and masks."""
    for item in ids:
        if store is not None and item not in store:
            continue
        sample = ds.load(item)
        if sample.mask is None:
            continue
        yield item, sample, (store.get([item])[0] if store is not None else None)


def prediction_pictures(trainer, spec: JobSpec, store, count: int) -> np.ndarray | None:
    """A grid (image | ground truth | CAM pseudo-label | prediction) of the first ``count`` val images with
    maps and masks, as HWC uint8 for TensorBoard; None when there is nothing to show."""
    from diclip import viz
    from diclip.data import open_split

    ds = open_split(spec.data, spec.data.val_split)
    rows, labels = [], []
    # rank 0 alone draws, after the checkpoint saved the RNG: drawing must not move the stream resume restores
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        for item, sample, rec in _val_samples(ds, ds.ids, store):
            if len(rows) >= count:
                break
            seg, cam = trainer.predict_sample(sample.image, sample.mask.shape, sample.label, rec)
            rows.append([sample.image, viz.colorize(sample.mask), viz.colorize(cam), viz.colorize(seg)])
            labels.append(item)
    if not rows:
        return None
    grid = viz.picture_grid(rows, ("image", "ground truth", "CAM pseudo-label", "prediction"), TB_PICTURE_CELL,
                            row_labels=labels)
    return np.asarray(grid.convert("RGB"))


# ----------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------
class TensorBoardLog:
    """Rank 0's TensorBoard events (losses, lr, validation mIoUs, prediction pictures).

    SummaryWriter appends to a local file and cannot write to S3 through our endpoint settings, so events
    go to a local temporary folder and :meth:`sync` copies it to ``{train.output}/tensorboard/`` (at each
    validation and at the end). A restarted worker writes a new event file next to the old ones; TensorBoard
    reads them together. Other ranks hold a no-op log."""

    def __init__(self, spec: JobSpec, rank: int, start: int = 0):
        self.dest = storage.join(spec.train.output, TENSORBOARD)
        self.dir: str | None = None
        self.writer = None
        if rank == 0:
            import tempfile

            from torch.utils.tensorboard import SummaryWriter

            self.dir = tempfile.mkdtemp(prefix="diclip-tb-")
            # a resumed run: TensorBoard hides what earlier event files hold from ``start`` on (those steps
            # run again), so each step is shown once
            self.writer = SummaryWriter(log_dir=self.dir, purge_step=start or None)

    @staticmethod
    def tag(key: str) -> str:
        """``val_miou`` -> ``val/miou``, ``loss`` -> ``train/loss``: one TensorBoard section per source."""
        return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"

    def scalars(self, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(self.tag(k), float(v), step)

    def picture(self, step: int, grid: np.ndarray | None) -> None:
        if self.writer is not None and grid is not None:
            self.writer.add_image("val/predictions", grid, step, dataformats="HWC")

    def sync(self) -> None:
        """Flush and copy every event file to the train output (whole files: they are small), best effort:
        an unreachable store leaves them for the next sync."""
        if self.writer is None or self.dir is None:
            return
        self.writer.flush()
        for base, _, files in os.walk(self.dir):
            for name in files:
                path = os.path.join(base, name)
                with open(path, "rb") as f:
                    data = f.read()
                dest = storage.join(self.dest, os.path.relpath(path, self.dir))
                best_effort(f"TensorBoard events {self.dest}", lambda: storage.write_bytes(dest, data))

    def close(self) -> None:
        import shutil

        if self.writer is None:
            return
        self.sync()
        self.writer.close()
        shutil.rmtree(self.dir or "", ignore_errors=True)
        self.writer = None
