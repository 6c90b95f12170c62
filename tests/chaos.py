"""Chaos scenarios on a real multi-node Ray cluster and a real object store, shared by the CI chaos test
(tests/cluster/test_chaos.py, which asserts) and ``bench/chaos.py`` (which prints the table).

Each scenario runs one stage of the tiny pipeline through ``ray_jobs.pipeline.run_stage`` (what ``diclip
run`` does per stage) while a fault is injected from a thread once the stage is demonstrably in the middle
(shards committed, a checkpoint registered), and reports what a user would ask: did it finish without a
person, were items lost or duplicated, how many training steps were redone, how long did it take.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from diclip import storage
from ray_jobs import pipeline
from ray_jobs.stages import train_runs
from ray_jobs.runtime.shards import list_shards

CORRELATE = ["synthesize.num_train=12", "synthesize.num_val=4", "correlate.resources.batch_size=2",
             "correlate.resources.concurrency=1", "correlate.resources.num_cpus=0.5",
             "correlate.resources.prepare_cpus=0.25"]
TRAIN = ["train.max_iters=6", "train.eval_every=2", "train.log_every=1", "train.val_limit=2", "train.warmup_iters=1",
         "train.mode=online", "train.num_workers=2", "train.resources.num_cpus=0.25"]


@dataclass
class Outcome:
    fault: str
    stage: str
    finished: bool = False
    error: str = ""
    expected: int = 0  # items (maps) or steps the stage must produce
    committed: int = 0  # distinct items committed / distinct steps logged
    duplicated: int = 0  # items committed more than once / steps logged more than once
    steps_redone: int = 0  # training steps run again after a restart (lost work)
    seconds: float = 0.0
    recoveries: dict = field(default_factory=dict)
    fault_at: float | None = None  # seconds into the stage when the fault hit

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.committed)


def _quiet(check: Callable[[], bool]) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with storage.retry_budget(0):
                return check()
        except Exception:  # noqa: BLE001 - the store may be the thing that is down; look again
            return False
    return ready


class Injector(threading.Thread):
    """Runs ``fault()`` once ``ready()`` holds (polling), then ``after()`` (e.g. a replacement node)."""

    def __init__(self, ready: Callable[[], bool], fault: Callable[[], None], after: Callable[[], None] | None = None):
        super().__init__(daemon=True)
        self.ready, self.fault, self.after = _quiet(ready), fault, after
        self.hit_at: float | None = None
        self.note: dict = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while not self.ready():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)
            self.hit_at = time.monotonic()
            self.fault()
            if self.after is not None:
                self.after()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e


def shards_at_least(spec, n: int) -> Callable[[], bool]:
    return lambda: len(list_shards(spec.correlate.output)) >= n


def driver_until(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], err_path: str | None = None,
                 timeout_s: float = 240.0):
    """A ``diclip`` command started as its own process (a job's driver), returned once ``ready()`` holds, it
    exited, or ``timeout_s`` passed: the caller stops it (SIGTERM, as ``diclip stop`` does first) or kills it.
    Its stderr goes to ``err_path`` (a file, not a pipe: Ray's logs must not fill a pipe) or nowhere."""
    import subprocess

    with open(err_path or os.devnull, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.2)
    return proc


def checkpoint_registered(spec) -> Callable[[], bool]:
    return lambda: train_runs.registered_step(spec) is not None


def logged_steps(spec) -> list[tuple[str, int]]:
    uri = storage.join(spec.train.output, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    out = []
    for line in storage.read_text(uri).splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") in ("train", "eval"):
            out.append((r["kind"], int(r["step"])))
    return out


def run_stage_with(spec, stage: str, fault: str, injector: Injector | None) -> Outcome:
    from ray_jobs.runtime.ray_session import init_ray

    init_ray(spec)  # joined before the stage, as `diclip run` does: the stage's record sees which nodes it lost
    out = Outcome(fault=fault, stage=stage)
    steps_at_fault: list[int] = []
    if injector is not None and stage == "train":
        inner = injector.fault

        def fault_and_note() -> None:  # how far training had got when the fault hit (steps beyond are redone)
            steps_at_fault.append(max((s for _, s in logged_steps(spec)), default=0))
            inner()

        injector.fault = fault_and_note
        injector.start()
    elif injector is not None:
        injector.start()
    t0 = time.monotonic()
    try:
        summary = pipeline.run_stage(spec, stage)
        out.finished = True
        out.recoveries = {k: v for k, v in summary.get("recoveries", {}).items() if k != "line"}
    except Exception as e:  # noqa: BLE001 - a scenario's outcome, reported
        out.error = " ".join(str(e).split())[:300]
    out.seconds = time.monotonic() - t0
    if injector is not None:
        injector.join(timeout=120)
        if injector.error is not None:
            raise injector.error
        out.fault_at = None if injector.hit_at is None else injector.hit_at - t0
    if stage == "correlate":
        ids: list[str] = []
        manifest = storage.read_manifest(spec.correlate.output)
        shards = [storage.join(spec.correlate.output, s.path) for s in manifest.shards] if manifest else \
            list_shards(spec.correlate.output)
        for s in shards:
            ids += storage.read_parquet(s, columns=["item_id"]).column("item_id").to_pylist()
        out.expected = spec.synthesize.num_train + spec.synthesize.num_val
        out.committed, out.duplicated = len(set(ids)), len(ids) - len(set(ids))
    else:
        logged = logged_steps(spec)
        out.expected = spec.train.max_iters
        out.committed = len({s for _, s in logged})
        out.duplicated = len(logged) - len(set(logged))
        resumes = [r for r in out.recoveries.get("resumed_from_steps", [])]
        if steps_at_fault and resumes:
            out.steps_redone = max(0, steps_at_fault[0] - resumes[0])
    return out
