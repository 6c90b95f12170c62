"""The training loop of one worker as one object, built from :mod:`diclip.train.components` (the torchtitan
split: a trainer that owns its engine, checkpointer, metrics and TensorBoard log).

It knows nothing of Ray: batches come from any iterator, and each validation's checkpoint directory goes to a
``report`` callable. ``ray_jobs/stages/train.py`` is the adapter that hands it Ray Train's dataset shard,
restored checkpoint and ``ray.train.report``; a test or another launcher can hand it anything else.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from diclip import storage
from diclip.config import JobSpec, to_yaml
from diclip.logging import get_logger
from diclip.train import components as C
from diclip.train.deepspeed_config import per_worker_batch
from diclip.train.files import EXPORT, PROGRESS
from diclip.train.trainer import DiCLIPTrainer

log = get_logger("diclip.train")
Report = Callable[[dict, str], None]
"""``report(metrics, checkpoint_dir)``: hands a validation's metrics and its checkpoint to the launcher."""


class TrainingLoop:
    """One rank's run: build the model and engine, resume from a checkpoint directory, train to
    ``train.max_iters`` with logging, validation and checkpoints, and (rank 0) export the result."""

    def __init__(self, spec: JobSpec, rank: int, world: int, device: torch.device, fit: str = ""):
        t = spec.train
        self.spec, self.rank, self.world, self.device, self.fit = spec, rank, world, device, fit
        torch.manual_seed(t.seed)  # identical trainable init on every rank (DeepSpeed also broadcasts rank 0's)
        self.trainer = DiCLIPTrainer(spec, device)
        self.engine, self.optimizer = C.build_engine(self.trainer, spec, device)
        torch.manual_seed(t.seed * 1000 + rank)  # per-rank dropout stream
        self.checkpointer = C.Checkpointer(rank, world, t.seed)
        self.per_worker = per_worker_batch(spec)
        self.start = 0
        self.store = None
        if t.mode == "stored":
            from diclip.data.map_shards import CorrelationStore

            self.store = CorrelationStore(t.correlation)

    def load(self, directory: str) -> int:
        """Restore engine, RNG and step from a checkpoint directory; returns the step training goes on from."""
        self.start = self.checkpointer.load(self.engine, directory)
        return self.start

    def run(self, batches: Iterator[dict], report: Report, restarted: bool = False) -> None:
        """Train from :attr:`start` to ``max_iters`` on ``batches`` (this rank's, in position order from
        ``start``). ``restarted``: the launcher restored this checkpoint after a failure (not a fresh resume)."""
        t = self.spec.train
        self.metrics = C.StepMetrics(self.spec, self.rank, self.world, self.per_worker * t.grad_accum * self.world,
                                     self.start, fit=self.fit)
        self._record_start(restarted)
        self.tb = C.TensorBoardLog(self.spec, self.rank, self.start)
        rows = C.RankBatches(batches, self.rank, self.world, self.per_worker)
        self.engine.train()
        for step in range(self.start, t.max_iters):
            self.metrics.add(C.train_step(self.engine, self.trainer, rows, step, t.grad_accum, self.device))
            done = step + 1
            is_eval = done % t.eval_every == 0 or done == t.max_iters
            if done % t.log_every and not is_eval:
                continue
            metrics = self._log_step(done)
            if is_eval:
                self._validate(done, metrics, report)
            else:
                self.metrics.record("train", metrics)
                self.tb.scalars(done, metrics)
        self.tb.close()
        if self.rank == 0:
            export(self.spec, self.trainer, self.engine.module)

    def _record_start(self, restarted: bool) -> None:
        """The log and, after a failure, the run summary say where the run went on from."""
        if self.start == 0:
            self.metrics.record("setup", {"step": 0, **C.precision_report(self.trainer, self.engine)})
            return
        # Ray Train hands a checkpoint to the first attempt of a re-run too (it restores the run's snapshot): a
        # restart after a failure is an attempt of a fit that has already logged
        after_failure = restarted and self.metrics.logged_in_this_fit()
        self.metrics.record("resume", {"step": self.start, "after_failure": after_failure})
        if self.rank == 0:
            log.warning("train: %s from the checkpoint at step %d", "worker group restarted after a failure; resumed"
                        if after_failure else "resumed", self.start)

    def _log_step(self, done: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"step": done, "lr": self.optimizer.param_groups[0]["lr"], **self.metrics.flush()}
        if self.rank == 0:
            log.info("step %d/%d loss %.4f seg %.4f aff %.4f adapter %.4f lr %.3e %.1f samples/s", done,
                     self.spec.train.max_iters, metrics.get("loss", float("nan")),
                     metrics.get("seg_loss", float("nan")), metrics.get("aff_loss", float("nan")),
                     metrics.get("adapter_loss", float("nan")), metrics["lr"], metrics["samples_per_s"])
        return metrics

    def _validate(self, done: int, metrics: dict[str, Any], report: Report) -> None:
        """Validation, the checkpoint (every rank) handed to ``report``, then rank 0's progress and pictures."""
        t = self.spec.train
        metrics.update(C.validate(self.trainer, self.spec, self.rank, self.world, done, self.store))
        with self.checkpointer.saved(self.engine, done, metrics) as directory:
            report(metrics, directory)
        self.metrics.record("eval", metrics)
        if self.rank != 0:
            return
        C.best_effort("training progress",
                      lambda: storage.write_json(storage.join(t.output, PROGRESS), {"step": done}))
        log.info("step %d: val mIoU %.4f, CAM mIoU %.4f (checkpoint reported)", done, metrics["val_miou"],
                 metrics["val_cam_miou"])
        self.tb.scalars(done, metrics)
        if t.tensorboard_pictures:
            self.tb.picture(done, C.prediction_pictures(self.trainer, self.spec, self.store, t.tensorboard_pictures))
        self.tb.sync()


def export(spec: JobSpec, trainer: DiCLIPTrainer, module) -> None:
    """Everything inference needs besides CLIP/diffusion weights: trainable weights, cache, spec, card."""
    from diclip.data.classes import class_set_to_dict
    from diclip.models.kv_cache import save_cache

    out = storage.join(spec.train.output, EXPORT)
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.trainable_state_dict().items()}
    storage.save_tensors(storage.join(out, "model.safetensors"), state, {"format": "diclip-trainable-v1"})
    save_cache(storage.join(out, "cache"), trainer.cache)
    storage.write_text(storage.join(out, "spec.yaml"), to_yaml(spec))
    storage.write_json(storage.join(out, "card.json"), {
        "classes": list(trainer.class_set.classes),
        "dataset": trainer.class_set.name,
        "class_set": class_set_to_dict(trainer.class_set),  # inference needs no classes file
        "clip": trainer.clip.model_id,
        "crop_size": spec.data.crop_size,
        "steps": spec.train.max_iters,
        "mode": spec.train.mode,
        "precision_trainable": str(next(module.parameters()).dtype).replace("torch.", ""),
    })
