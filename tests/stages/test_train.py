import dataclasses
import io
import json

import pytest
import torch

from diclip import storage
from diclip.data import get_class_set
from diclip.errors import ConfigError
from diclip.models.kv_cache import save_cache
from diclip.train.data import build_items, load_rows, rank_positions, rank_table
from diclip.train.deepspeed_config import build_deepspeed_config
from diclip.train.trainer import DiCLIPTrainer, batch_from_rows
from ray_jobs.stages import correlate, synthesize, train, train_runs
from tests.helpers import random_cache, tiny_spec

pytestmark = pytest.mark.timeout(600)
BANK = ["correlate.crops_per_image=2"]
TRAIN = ["train.max_iters=4", "train.eval_every=2", "train.log_every=1", "train.val_limit=4", "train.warmup_iters=1",
         "train.keep_checkpoints=2", "correlate.max_failed_fraction=0.3", "train.max_failed_fraction=0.2"]
CORRUPT = ("synth_train_00001", "synth_val_00002")
"""One corrupt image per split: correlate fails them, training drops the train one (recorded) and validation
skips the val one (counted); within the fractions TRAIN allows."""


def _prepare(root, *overrides, endpoint_url=None, reuse=None):
    """A training spec under ``root`` with its data, maps and cache ready. ``reuse``: a spec prepared before
    whose data and maps this one reads (a stage run saved; training writes neither)."""
    if reuse is not None:
        spec = tiny_spec(root, *TRAIN, *overrides, f"data.root={reuse.data.root}",
                         f"correlate.output={reuse.correlate.output}", endpoint_url=endpoint_url)
    else:
        spec = tiny_spec(root, *TRAIN, *overrides, endpoint_url=endpoint_url)
        synthesize.run(spec)
        for item in CORRUPT:
            storage.write_bytes(storage.join(spec.data.root, "JPEGImages", f"{item}.jpg"), b"not a jpeg")
        correlate.run(spec)
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
    return spec


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    """Local data (with the CORRUPT images) and its maps, made once for the tests that only train on them."""
    return _prepare(str(tmp_path_factory.mktemp("prepared") / "run"))


def _metrics(spec):
    lines = storage.read_text(storage.join(spec.train.output, "metrics.jsonl")).splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_server):
    """One 2-worker run whose checkpoints, metrics and export all live in an S3 bucket (SeaweedFS)."""
    import uuid

    import boto3

    from diclip.storage import StorageOptions, configure

    bucket = f"diclip-train-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    configure(StorageOptions(endpoint_url=s3_server))
    try:
        # trains from a per-crop map bank (K=2), so the exact-resume test below covers the bank too
        spec = _prepare(f"s3://{bucket}/run", *BANK, endpoint_url=s3_server)
        summary = train.run(spec)
        yield spec, summary
    finally:
        configure(None)


def test_positions_are_disjoint_and_deterministic():
    p0 = rank_positions(0, 2, 3, 0, 4)
    p1 = rank_positions(1, 2, 3, 0, 4)
    assert not set(p0) & set(p1) and sorted(set(p0) | set(p1)) == list(range(24))
    assert list(rank_positions(1, 2, 3, 2, 4)) == list(p1[6:])  # resuming at micro-step 2


def test_loss_decreases_on_a_fixed_batch(prepared, tmp_path):
    spec = _prepare(str(tmp_path / "run"), "model.dropout=0.0", reuse=prepared)
    items = build_items(spec, "train", spec.correlate.output)
    rows = load_rows(rank_table(items, 0, 1, 4, 0, 1, 0).to_pydict() | {}, crop=64, scale_range=(0.75, 1.5),
                     flip=True, seed=0, with_maps=True)
    torch.manual_seed(0)
    trainer = DiCLIPTrainer(spec)
    batch = batch_from_rows(rows, "cpu")
    opt = torch.optim.AdamW([p for g in trainer.param_groups() for p in g["params"]], lr=1e-3)
    clip_before = [p.clone() for p in trainer.clip.model.parameters()]
    names = {id(p) for g in trainer.param_groups() for p in g["params"]}
    assert names == {id(p) for m in trainer.model.trainable_modules().values() for p in m.parameters()}
    losses = []
    for step in range(8):
        out = trainer.losses(batch, step=0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(a, b) for a, b in zip(clip_before, trainer.clip.model.parameters()))


def _tensorboard_events(spec, local_dir):
    """The run's TensorBoard folder copied down (as a user would from S3) and read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = storage.join(spec.train.output, "tensorboard")
    files = storage.list_files(folder)
    assert sum("tfevents" in f for f in files) == 1, files  # one writer: rank 0 of the 2-worker run
    for f in files:
        target = local_dir / f[len(folder):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(f))
    acc = EventAccumulator(str(local_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_two_worker_run_writes_metrics_checkpoints_and_export(s3_run, tmp_path):
    spec, summary = s3_run
    assert summary["steps"] == 4 and 0 <= summary["val_miou"] <= 1
    m = _metrics(spec)
    assert [r["step"] for r in m if r["kind"] == "eval"] == [2, 4]
    assert [r["step"] for r in m if r["kind"] == "train"] == [1, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m if r["kind"] != "setup")
    # the corrupt val image has no map: skipped and counted, not silently averaged away
    assert all((r["val_images"], r["val_images_skipped"]) == (3, 1) for r in m if r["kind"] == "eval")
    setup = [r for r in m if r["kind"] == "setup"]
    assert setup and setup[0]["precision"] == "fp32" and setup[0]["dtype_trainable"] == "float32"
    manifest = storage.read_manifest(spec.train.output)
    assert manifest.extra["best_checkpoint"]["step"] in (2, 4)
    # printed and recorded as whole URIs (Ray Train reports s3 paths without their scheme)
    for path in (manifest.extra["best_checkpoint"]["path"], manifest.extra["last_checkpoint"], summary["checkpoint"]):
        assert path.startswith(spec.train.output + "/ray/") and storage.exists(storage.join(path, "diclip_state.json"))
    # the corrupt train image failed in correlate: training left it out and says so
    assert (manifest.num_items, manifest.num_failed) == (5, 1)
    assert storage.read_failures(spec.train.output) == [(CORRUPT[0], "no correlation map (failed in correlate)")]
    # more drops than train.max_failed_fraction: refused before any worker starts, with the reason
    from diclip.errors import StageFailed

    strict = dataclasses.replace(spec, train=dataclasses.replace(spec.train, max_failed_fraction=0.1,
                                                                  output=f"{spec.output_uri}/train_strict"))
    with pytest.raises(StageFailed, match=r"^train: 1 of 6 items failed .* 1x no correlation map"):
        train.run(strict)
    assert not storage.is_complete(strict.train.output)
    export = storage.join(spec.train.output, "export")
    tensors, meta = storage.load_tensors(storage.join(export, "model.safetensors"))
    assert any(k.startswith("adapter.") for k in tensors) and any(k.startswith("segmenter.") for k in tensors)
    assert not any(k.startswith("encoder.") for k in tensors)
    assert storage.exists(storage.join(export, "cache", "kv_cache.safetensors"))
    ckpt = summary["checkpoint"]  # checkpoints went to the bucket, through our endpoint
    assert ckpt.startswith("s3://")  # a whole URI, as printed
    files = storage.list_files(ckpt)
    assert any(f.endswith("diclip_state.json") for f in files)
    assert any(f.endswith("rng_rank1.safetensors") for f in files)  # every rank's part is in the one folder
    assert any("zero_pp_rank_1" in f for f in files)
    # TensorBoard (rank 0, copied to the bucket): losses and lr every logged step, mIoUs and pictures per validation
    events = _tensorboard_events(spec, tmp_path / "tb")
    tags = events.Tags()
    assert {"train/loss", "train/seg_loss", "train/aff_loss", "train/adapter_loss", "train/lr", "val/miou",
            "val/cam_miou"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [(e.step, e.value) for e in events.Scalars("val/miou")] == \
        [(r["step"], pytest.approx(r["val_miou"])) for r in m if r["kind"] == "eval"]
    pictures = events.Images("val/predictions")
    assert [p.step for p in pictures] == [2, 4] and pictures[0].width > pictures[0].height > 0
    from PIL import Image

    curves = Image.open(io.BytesIO(storage.read_bytes(storage.join(spec.train.output, "curves.png"))))
    assert curves.format == "PNG" and curves.size == (1000, 400)


def test_resume_reproduces_the_next_step_exactly(s3_run, s3_server):
    """Resumed from the step-2 checkpoint, step 3 is bit-identical: the same bank crops, noise-free maps,
    optimizer state, LR and RNG."""
    spec, summary = s3_run
    first = {r["step"]: r for r in _metrics(spec)}
    ray_dir = storage.join(spec.train.output, "ray", f"{spec.name}-train")
    states = [f for f in storage.list_files(ray_dir) if f.endswith("diclip_state.json")]
    step2 = [f.rsplit("/", 1)[0] for f in states if storage.read_json(f)["step"] == 2]
    assert step2, states
    resumed = tiny_spec(spec.output_uri, *TRAIN, *BANK, f"train.output={spec.output_uri}/train_resumed",
                        f"train.resume_from={step2[0]}", endpoint_url=s3_server)
    train.run(resumed)
    again = {r["step"]: r for r in _metrics(resumed)}
    assert 3 in again and 4 in again and 1 not in again
    for k in ("loss", "seg_loss", "aff_loss", "adapter_loss", "lr"):
        assert again[3][k] == first[3][k], k  # bit-for-bit
    assert again[4]["val_miou"] == first[4]["val_miou"]


def test_bf16_trains_only_the_heads_in_bf16_and_matches_fp32(s3_run, tmp_path):
    """train.precision=bf16 on 2 CPU workers: DeepSpeed casts only the adapter + segmenter; the frozen
    CLIP stays fp32, so the step runs (it crashed when the whole model went through DeepSpeed), and
    its losses match the fp32 run of the same data, seed, models and schedule within bf16's resolution.
    Step 1 is before any update and step 2 follows the warm-up step (lr x 1e-6); steps 3 and 4 follow
    full-lr bf16 optimizer steps, so they compare the update too."""
    fp32_spec, _ = s3_run
    spec = _prepare(str(tmp_path / "run"), *BANK, "train.precision=bf16", "train.keep_checkpoints=1", reuse=fp32_spec,
                    endpoint_url=fp32_spec.storage.endpoint_url)  # the same data and maps as the fp32 run
    assert spec.train.max_iters == fp32_spec.train.max_iters and spec.train.warmup_iters == fp32_spec.train.warmup_iters
    train.run(spec)
    m = _metrics(spec)
    setup = [r for r in m if r["kind"] == "setup"][0]
    assert setup["precision"] == "bf16" and setup["dtype_trainable"] == "bfloat16" and setup["dtype_clip"] == "float32"
    ref = {r["step"]: r for r in _metrics(fp32_spec) if r["kind"] != "setup"}
    got = {r["step"]: r for r in m if r["kind"] != "setup"}
    assert got[3]["lr"] == pytest.approx(ref[3]["lr"]) and got[3]["lr"] > 0.5 * spec.train.lr
    for step in (1, 2, 3, 4):
        for k in ("loss", "seg_loss", "aff_loss", "adapter_loss"):
            # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2%); through the heads' layers
            # and the optimizer steps the losses stay within 3% of fp32's
            assert got[step][k] == pytest.approx(ref[step][k], rel=0.03), (step, k)
    assert got[3]["loss"] != got[1]["loss"]
    card = storage.read_json(storage.join(spec.train.output, "export", "card.json"))
    assert card["precision_trainable"] == "bfloat16"


def test_bad_train_configs_fail_with_one_line(tmp_path):
    spec = tiny_spec(str(tmp_path), "train.zero_stage=3")
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(spec)
    assert "zero_stage=3" in str(e.value) and "\n" not in str(e.value)
    spec = tiny_spec(str(tmp_path), "train.global_batch=5")
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(spec)
    assert "divisible" in str(e.value)
    spec = tiny_spec(str(tmp_path), "train.global_batch=8", "train.grad_accum=2")
    assert build_deepspeed_config(spec)["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        build_deepspeed_config(tiny_spec(str(tmp_path), "train.precision=fp16"))
    cfg = build_deepspeed_config(tiny_spec(str(tmp_path), "train.precision=bf16"))
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    cfg = build_deepspeed_config(tiny_spec(str(tmp_path)))  # auto on CPU: fp32
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    with pytest.raises(ConfigError, match="train.precision must be"):
        tiny_spec(str(tmp_path), "train.precision=fp8")


def _registered_step(spec) -> int:
    """The step of the latest checkpoint Ray Train has registered for this run (0: none yet)."""
    try:
        return train_runs.registered_step(spec) or 0
    except Exception:  # the snapshot is being rewritten: look again
        return 0


def _kill_train_workers(spec, killed: list, times: int = 1) -> None:
    """Test-only fault injection, ``times`` times: once Ray Train has registered a checkpoint (the first; then one
    the restarted worker group made past the step it resumed from), SIGKILL one Ray Train worker - a process this
    test's own Ray instance started (found among this process's descendants). ``killed``: (pid, step seen)."""
    import os
    import signal
    import time

    import psutil

    deadline = time.time() + 240
    seen = 0
    while time.time() < deadline and len(killed) < times:
        if killed:  # after a kill: a checkpoint the restarted group made, past the step it resumed from
            resumed = [r["step"] for r in _metrics_or_none(spec) if r["kind"] == "resume"]
            if not resumed:
                time.sleep(0.2)
                continue
            seen = max(seen, resumed[-1])
        step = _registered_step(spec)
        if step > seen:
            for p in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()) and p.pid not in {k for k, _ in killed}:
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append((p.pid, step))
                        seen = step
                        break
                except psutil.Error:
                    continue
        time.sleep(0.2)


def test_a_lost_worker_is_recovered_until_the_restarts_run_out_then_one_line_and_the_rerun_resumes(prepared,
                                                                                                    tmp_path):
    """``train.max_failures=1``: the first lost worker is recovered in the same run from the last checkpoint;
    the second (after the restarted group checkpointed again) is one more than allowed: one line (no
    WorkerGroupError traceback) that names the checkpoint a re-run resumes from. The re-run does, and the
    training log holds each step once."""
    import threading

    from diclip.errors import StageFault
    from ray_jobs import pipeline

    spec = _prepare(str(tmp_path / "run"), "train.max_failures=1", "train.keep_checkpoints=1", "train.max_iters=12",
                    reuse=prepared)
    killed: list = []
    killer = threading.Thread(target=_kill_train_workers, args=(spec, killed, 2), daemon=True)
    killer.start()
    with pytest.raises(StageFault) as err:
        pipeline.run_stage(spec, "train")
    killer.join(timeout=5)
    assert len(killed) == 2, f"killed {killed}: the run did not lose a worker twice"
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train: ") and msg.endswith("; run again to resume"), msg
    step = train.read_checkpoint_step(train.interrupted_checkpoint(spec))
    assert f"training resumes from the checkpoint at step {step} (" in msg and step >= 4, msg
    m = _metrics(spec)
    assert [r["kind"] for r in m].count("setup") == 1
    restarts = [r for r in m if r["kind"] == "resume"]
    assert len(restarts) == 1 and restarts[0]["after_failure"] and restarts[0]["step"] >= 2  # from a checkpoint
    summary = pipeline.run_stage(spec, "train")  # the re-run resumes where the restarts ran out, and finishes
    assert summary["steps"] == 12
    m = _metrics(spec)
    assert [(r["step"], r["after_failure"]) for r in m if r["kind"] == "resume"] == \
        [(restarts[0]["step"], True), (step, False)]
    logged = [(r["kind"], r["step"]) for r in m if r["kind"] in ("train", "eval")]
    assert len(logged) == len(set(logged))  # each step once: what the failed attempts logged past it is gone
    assert [r["step"] for r in m if r["kind"] == "eval"][-1] == 12
    manifest = storage.read_manifest(spec.train.output)
    run_dir = storage.join(spec.train.output, "ray", f"{spec.name}-train")
    managed = {storage.join(run_dir, r["checkpoint_dir_name"]) for r in
               storage.read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json"))["checkpoint_results"]}
    # keep_checkpoints=1: the best by val mIoU and the last (an upload a kill cut short may linger unregistered)
    assert managed == {manifest.extra["best_checkpoint"]["path"], manifest.extra["last_checkpoint"]}


def test_ctrl_c_and_sigterm_stop_training_within_seconds_and_the_rerun_resumes(ray_session, tmp_path):
    """SIGINT during training: Ray Train's own "graceful abort" kept going for 40+ s; SIGTERM (what Kubernetes
    sends, killing 30 s later) was ignored too. Now the driver stops in seconds with one line on either, keeps
    the committed checkpoint, and a re-run continues from it instead of step 0. One run is interrupted by each
    signal (the second while it trains from the first's checkpoint), then a third finishes.

    The runs start their own Ray with ``ray.dashboard=false`` while this test's session is a second instance
    on the host: Ray Train's placement-group cleaner, which needs the State API that such an instance lacks,
    printed a traceback ("Found multiple active Ray instances"); the pipeline leaves it out there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from ray_jobs.runtime.interrupt import MESSAGE
    from tests.helpers import process_tree

    root = str(tmp_path / "run")
    # 16 steps: the SIGTERM lands while the resumed run still has steps to go (at 6, a 0.25 s controller poll
    # let it reach its last checkpoint first, and the third run had nothing left to train)
    args = ["train.max_iters=16", "train.eval_every=2", "train.log_every=1", "train.val_limit=2",
            "train.warmup_iters=1", "train.mode=online",  # online maps: no correlate stage to prepare
            "ray.dashboard=false", "train.num_workers=1"]  # one worker: three runs' start-up is the cost
    spec = tiny_spec(root, *TRAIN, *args)
    synthesize.run(spec)
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
    cmd = [sys.executable, "-m", "diclip.cli", "train", "configs/tiny.yaml", f"output_uri={root}",
           "ray.progress_bars=false", "synthesize.num_train=6", "synthesize.num_val=4",
           "synthesize.image_size=[64,80]", "correlate.max_side=80", "correlate.resources.batch_size=3", *args]
    env = dict(os.environ, DICLIP_LOG_LEVEL="INFO")

    def registered() -> bool:  # committed = a checkpoint Ray Train has registered, not merely logged
        return _registered_step(spec) > 0

    def setups() -> int:  # each worker-group start logs one setup (or, from a checkpoint, resume) record
        return sum(r["kind"] in ("setup", "resume") for r in _metrics_or_none(spec))

    def interrupt(sig: int, ready, log_name: str) -> int:
        with open(tmp_path / log_name, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and not ready() and proc.poll() is None:
                time.sleep(0.2)
            assert ready(), f"training never got to the point of the {signal.Signals(sig).name}"
            started = process_tree(proc.pid)  # the driver, the local Ray it started, its workers
            proc.send_signal(sig)
            proc.wait(timeout=30)  # the contract: stopped within 30 s
        finally:
            if proc.poll() is None:
                proc.kill()
        assert (tmp_path / log_name).read_text().strip().splitlines()[-1] == MESSAGE
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"  # the local Ray went with the driver
        return proc.returncode

    assert interrupt(signal.SIGINT, registered, "first.txt") == 130
    assert not storage.is_complete(spec.train.output)
    before = setups()
    assert interrupt(signal.SIGTERM, lambda: setups() > before, "second.txt") == 143  # training again, resumed
    assert "resuming from" in (tmp_path / "second.txt").read_text()
    assert not storage.is_complete(spec.train.output)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout + again.stderr
    m = _metrics(spec)
    last = m[max(i for i, r in enumerate(m) if r["kind"] == "resume"):]
    assert last[0]["step"] >= 2 and last[1]["step"] > 1 and last[-1]["step"] == 16  # continued past step 1, finished
    logged = [(r["kind"], r["step"]) for r in m if r["kind"] in ("train", "eval")]
    assert len(logged) == len(set(logged))  # each step once after two resumes
    assert storage.is_complete(spec.train.output)
    logs = (tmp_path / "first.txt").read_text() + (tmp_path / "second.txt").read_text() + again.stdout + again.stderr
    assert "PlacementGroupCleaner" not in logs and "multiple active Ray instances" not in logs
    # the finishing run's log is diclip's lines: no library progress notes, false warnings or tracebacks
    noise = ("logging.cc", "Parsing tokenizer", "Progress bars disabled", "Reporting training result",
             "Checkpoint successfully created", "Started training worker group", "DeprecationWarning",
             "FutureWarning", "Traceback", "Cluster resources are not enough")
    found = [ln for ln in (again.stdout + again.stderr).splitlines() if any(n in ln for n in noise)]
    assert not found, found


def _metrics_or_none(spec):
    try:
        return _metrics(spec)
    except Exception:
        return []


def test_a_worker_group_no_node_can_host_stops_with_one_line(s3_run, s3_server):
    """On a cluster the local resource check cannot see what nodes exist: the watchdog turns a worker group
    that never starts into one line naming the request and what is free, and frees what the run held."""
    import time

    import ray

    from diclip.errors import DiclipError

    spec, _ = s3_run
    stalled = tiny_spec(spec.output_uri, *TRAIN, *BANK, f"train.output={spec.output_uri}/train_stalled",
                        "train.resources.num_cpus=64", "ray.stall_minutes=0.2", endpoint_url=s3_server)
    with pytest.raises(DiclipError) as e:
        train.run(stalled)
    msg = str(e.value)
    assert msg.startswith("train: no progress for 0.2 min") and "'CPU': 64" in msg and "free of" in msg, msg
    assert "\n" not in msg
    deadline = time.time() + 60  # the killed controller took its placement group and workers with it
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_a_changed_setting_trains_from_step_0_instead_of_resuming_the_old_run(ray_session, tmp_path):
    """Ray Train resumes any snapshot in its run folder: after ``train.lr`` changed, the old run's weights
    were exported again and marked complete under the new settings. Now the old run is cleared first."""
    args = ["train.max_iters=2", "train.eval_every=2", "train.val_limit=2", "train.num_workers=1",
            "train.mode=online"]  # online maps: no correlate stage to prepare
    spec = tiny_spec(str(tmp_path / "run"), *TRAIN, *args)
    synthesize.run(spec)
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
    weights = storage.join(spec.train.output, "export", "model.safetensors")
    import signal

    handler = signal.getsignal(signal.SIGINT)
    train.run(spec)
    assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's handler for the run is not left behind
    before = storage.read_bytes(weights)
    changed = tiny_spec(str(tmp_path / "run"), *TRAIN, *args, f"train.lr={spec.train.lr * 10}")
    assert not train.is_complete(changed) and train.stale(changed) == ["train.lr"]
    train.run(changed)
    m = _metrics(changed)
    last = max(i for i, r in enumerate(m) if r["kind"] == "setup")
    assert [r["step"] for r in m[last:] if r["kind"] in ("train", "eval")] == [1, 2]  # trained from step 0
    assert storage.read_bytes(weights) != before
    assert [r["kind"] for r in m].count("setup") == 1  # the old run's log went with it
    assert train.is_complete(changed) and not train.is_complete(spec)


def test_a_resume_from_inside_the_run_folder_being_replaced_is_refused(tmp_path):
    """Starting over deletes the old run's folder: a checkpoint there named as train.resume_from would be
    deleted before it is read, so that is one line instead (a checkpoint elsewhere is fine)."""
    spec = tiny_spec(str(tmp_path / "run"))
    record = storage.join(spec.train.output, "settings.json")  # the record every stage keeps of its settings
    storage.write_json(record, {"stage": "train", "hash": "another run", "settings": {}})
    inside = storage.join(train_runs.run_dir(spec), "checkpoint_2026")
    with pytest.raises(ConfigError, match="train.resume_from: .* run with other settings") as e:
        train.clear_other_run(tiny_spec(str(tmp_path / "run"), f"train.resume_from={inside.split('://')[-1]}"))
    assert "\n" not in str(e.value) and storage.exists(record)
    train.clear_other_run(tiny_spec(str(tmp_path / "run"), f"train.resume_from={tmp_path}/elsewhere"))
    assert not storage.exists(record)
