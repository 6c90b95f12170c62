"""The training loop knows nothing of Ray: :class:`diclip.train.loop.TrainingLoop` trains on any iterator of
batches and hands each validation's checkpoint to any ``report`` callable (Ray Train's adapter is one).

Here it runs in this process (one rank, gloo), fed by the same pure data functions the Ray Datasets map
(``rank_table``, ``load_rows``), and a second loop resumes from a checkpoint the first reported.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from diclip import storage
from diclip.data import get_class_set
from diclip.models.kv_cache import save_cache
from diclip.train.data import build_items, load_rows, rank_table
from diclip.train.deepspeed_config import per_worker_batch
from ray_jobs.stages import synthesize
from tests.helpers import random_cache, tiny_spec

pytestmark = pytest.mark.timeout(300)
ARGS = ["train.max_iters=4", "train.eval_every=2", "train.log_every=1", "train.val_limit=2", "train.warmup_iters=1",
        "train.mode=online", "train.num_workers=1", "train.tensorboard_pictures=0"]


@pytest.fixture
def one_rank():
    """torch.distributed with one gloo rank in this process (what Ray Train sets up for each worker)."""
    import torch.distributed as dist

    from ray_jobs.runtime.ray_session import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _batches(spec, start: int):
    """This rank's batches from step ``start`` on, as the Ray Dataset of the train stage yields them."""
    t, b = spec.train, per_worker_batch(spec)
    items = build_items(spec, spec.data.train_split, None)
    table = rank_table(items, 0, 1, b, start * t.grad_accum, t.max_iters * t.grad_accum, t.seed).to_pydict()
    rows = load_rows(table, crop=spec.data.crop_size, scale_range=tuple(spec.data.rescale_range),
                     flip=spec.data.flip, seed=t.seed, with_maps=False)
    for i in range(0, len(rows["pos"]), b):
        yield {k: v[i:i + b] for k, v in rows.items()}


def _log(spec) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(spec.train.output, "metrics.jsonl")).splitlines()]


def test_the_training_loop_trains_checkpoints_and_resumes_without_ray(one_rank, tmp_path, monkeypatch):
    from diclip._compat import default_ds_accelerator
    from diclip.train.loop import TrainingLoop

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for var, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():  # as Ray Train sets them
        monkeypatch.setenv(var, value)
    default_ds_accelerator(False)
    spec = tiny_spec(str(tmp_path / "run"), *ARGS)
    synthesize.run(spec)  # no Ray: the data, written in this process
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
    kept: dict[int, str] = {}

    def report(metrics: dict, directory: str) -> None:  # what Ray Train would upload: kept a copy of
        assert os.path.exists(os.path.join(directory, "diclip_state.json"))
        kept[metrics["step"]] = shutil.copytree(directory, tmp_path / f"ckpt{metrics['step']}")

    loop = TrainingLoop(spec, 0, 1, torch.device("cpu"))
    loop.run(_batches(spec, 0), report)
    assert sorted(kept) == [2, 4]
    first = {r["step"]: r for r in _log(spec) if r["kind"] in ("train", "eval")}
    assert sorted(first) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in first.values())
    assert storage.exists(storage.join(spec.train.output, "export", "model.safetensors"))

    resumed = TrainingLoop(spec, 0, 1, torch.device("cpu"))
    assert resumed.load(str(kept[2])) == 2
    resumed.run(_batches(spec, 2), lambda metrics, directory: None)
    log = _log(spec)
    assert [(r["kind"], r["step"]) for r in log if r["kind"] in ("setup", "resume")] == [("setup", 0), ("resume", 2)]
    again = {r["step"]: r for r in log[[r["kind"] for r in log].index("resume"):] if r["kind"] in ("train", "eval")}
    assert sorted(again) == [3, 4]  # each step once in the log: the first loop's 3 and 4 were dropped
    for k in ("loss", "seg_loss", "aff_loss", "adapter_loss", "lr"):
        assert again[3][k] == first[3][k], k  # the same step 3, bit for bit: weights, optimizer, LR, RNG, data
