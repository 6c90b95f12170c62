"""Batched model calls fall back to one item at a time: one bad item (or an OOM on a big batch) fails alone."""
import os
import time

import pandas as pd
import pytest

from diclip import storage
from ray_jobs.stages import correlate, synthesize
from ray_jobs.runtime.shards import list_shards
from ray_jobs.runtime.lineage import call_batched
from tests.helpers import tiny_spec


def test_call_batched_retries_one_by_one():
    calls = []

    def fn(xs):
        calls.append(list(xs))
        if len(xs) > 1:
            raise MemoryError("out of memory on the batch")
        if xs[0] == "bad":
            raise ValueError("bad item")
        return [x.upper() for x in xs]

    out = call_batched(fn, [["a", "bad", "c"]], "test")
    assert out[0] == "A" and out[2] == "C" and isinstance(out[1], ValueError)
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


def test_correlate_batch_failure_falls_back_per_item(tmp_path):
    spec = tiny_spec(str(tmp_path / "run"))
    synthesize.run(spec)
    actor = correlate.Correlator(spec, correlate.clip_patch_size(spec))  # the Ray Data actor class, in-process
    real = actor.diff
    seen = []

    def flaky(images, seeds):  # the batch call "runs out of memory"; single images go through
        seen.append(images.shape[0])
        if images.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(images, seeds)

    actor.diff = flaky
    ids = ["synth_train_00000", "synth_train_00001", "synth_train_00002"]
    batch = pd.DataFrame({"item_id": ids, "split": ["train"] * 3, "image": ids, "crop": [-1] * 3})
    report = actor(correlate.prepare_inputs(batch, spec, actor.patch, run="test"))  # the CPU task's output feeds the actor
    assert report["ok"].all() and list(report["item_id"]) == ids
    assert seen[0] == 3 and seen[1:] == [1, 1, 1]
    rows = storage.read_parquet(list_shards(spec.correlate.output)[0], columns=["item_id"]).column("item_id")
    assert sorted(rows.to_pylist()) == ids


class _Echo:
    def __init__(self):
        pass

    def __call__(self, batch):
        return batch.assign(ok=True, error="")


def test_a_stage_that_cannot_be_scheduled_stops_with_one_line(ray_session):
    """An actor pool asking for more than any node has waits forever in Ray; the watchdog turns "no
    progress" into an error naming the request and what the cluster has free."""
    from diclip.config import Resources
    from diclip.errors import DiclipError
    from ray_jobs.runtime.pool import run_pool

    res = Resources(num_cpus=64, concurrency=1, batch_size=2)  # this test cluster has 2 CPUs
    with pytest.raises(DiclipError) as e:
        run_pool([{"item_id": str(i)} for i in range(4)], _Echo, {}, res, desc="correlate", stall_s=8)
    msg = str(e.value)
    assert msg.startswith("correlate: no progress for") and "{'CPU': 64" in msg and "free of" in msg
    assert "\n" not in msg
    # Ray Data's executor stopped with the error: nothing is left polling a session the module will shut down
    import threading
    import time

    for _ in range(50):
        left = [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor") and t.is_alive()]
        if not left:
            break
        time.sleep(0.2)
    assert not left, left


def test_a_pool_that_starves_its_input_tasks_says_so(ray_session, monkeypatch):
    """A fixed-size pool that takes every CPU leaves its input tasks none: the watchdog's line says that (the
    requests fit the cluster), not that no node can meet them.

    The watchdog's clock stands still until the pool's actors hold both CPUs and then runs 20x fast: the
    stall is judged only once the actors are up (before that it would rightly read as "an actor may be
    stuck"), however slowly a loaded machine starts them, and the test waits seconds, not the stall's 40."""
    from diclip.config import Resources
    from diclip.errors import DiclipError
    from ray_jobs.runtime import watchdog
    from ray_jobs.runtime.pool import run_pool

    ray = ray_session
    started: list[float] = []

    def clock() -> float:
        if not started and ray.available_resources().get("CPU", 0) < 0.5:
            started.append(time.monotonic())
        return 0.0 if not started else 20 * (time.monotonic() - started[0])

    monkeypatch.setattr(watchdog, "clock", clock)
    res = Resources(num_cpus=1, prepare_cpus=0.5, concurrency=2, batch_size=2)  # 2 x 1 CPU = this test cluster
    with pytest.raises(DiclipError) as e:
        run_pool([{"item_id": str(i)} for i in range(4)], _Echo, {}, res, desc="correlate", stall_s=20,
                 prepare=_tag_input)
    msg = str(e.value)
    assert started, "the pool's actors never held the CPUs"
    assert msg.startswith("correlate: no progress for") and "\n" not in msg
    assert "input tasks (0.5 CPUs each) get none" in msg and "no node can meet" not in msg
    # the run's execution is stopped with it: the pool's actors give their CPUs back, so the next pool of
    # this (long-lived) driver can start - they held both CPUs and hung the next test before
    deadline = time.time() + 60
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def _never(stop):
    """A batch iterator whose source never delivers (until the test ends it)."""
    stop.wait()
    return
    yield  # pragma: no cover


def test_the_watchdog_stops_a_silent_stage_after_twice_the_stall_before_its_first_batch():
    """No Ray: the watchdog alone. Before the first batch it allows 2 x stall_s (Ray Data's actor-start
    timeout should speak first), after a batch stall_s; a stage that keeps delivering is never stopped."""
    import threading

    from diclip.config import Resources
    from diclip.errors import DiclipError
    from ray_jobs.runtime.watchdog import watched

    res = Resources(num_cpus=1, concurrency=1, batch_size=2)
    stop = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(DiclipError) as e:
        list(watched(_never(stop), "mask", res, stall_s=0.2))
    waited = time.monotonic() - t0
    stop.set()
    assert 0.4 <= waited < 5, waited
    msg = str(e.value)
    assert msg.startswith("mask: no progress for 0.00666667 min;") and "\n" not in msg
    assert "an actor or a call may be stuck" in msg  # no Ray to ask: nothing says the requests cannot fit

    def slow(n):  # a batch every 0.1 s: never a stall of 0.3 s
        for i in range(n):
            time.sleep(0.1)
            yield i

    assert list(watched(slow(8), "mask", res, stall_s=0.3)) == list(range(8))

    def then_silent():  # one batch, then nothing: stopped after stall_s, not 2 x stall_s
        yield 0
        stop2.wait()

    stop2 = threading.Event()
    got = []
    t0 = time.monotonic()
    with pytest.raises(DiclipError) as e:
        for b in watched(then_silent(), "mask", res, stall_s=0.3):
            got.append(b)
            t0 = time.monotonic()
    stop2.set()
    assert got == [0] and 0.3 <= time.monotonic() - t0 < 0.6 + 5
    assert "no progress for 0.005 min" in str(e.value)


def test_the_watchdog_passes_errors_through_and_names_an_actor_start_timeout():
    from diclip.config import Resources
    from diclip.errors import DiclipError
    from ray_jobs.runtime.watchdog import watched

    res = Resources(num_cpus=1, concurrency=1, batch_size=2)

    def failing(exc):
        yield 1
        raise exc

    with pytest.raises(KeyError):
        list(watched(failing(KeyError("x")), "mask", res, stall_s=5))
    timeout = RuntimeError("wrapped")
    timeout.__cause__ = TimeoutError("Timed out while starting actors after 5 s")
    with pytest.raises(DiclipError) as e:
        list(watched(failing(timeout), "mask", res, stall_s=5))
    assert str(e.value).startswith("mask: no progress for 0.0833333 min;")


class _CannotLoad:
    """An actor whose model is missing on its node (the driver's pre-flight check passed elsewhere)."""

    def __init__(self):
        from diclip.errors import ModelError

        raise ModelError("cannot load diffusion model '/models/sd21': no model_index.json")

    def __call__(self, batch):  # pragma: no cover - never constructed
        return batch


def test_an_actor_that_cannot_load_its_model_is_one_line(ray_session):
    """Ray reports an actor's constructor failure as ActorDiedError with the remote traceback as text; the
    stage re-raises the user's error, naming the stage, in one line."""
    from diclip.config import Resources
    from diclip.errors import ModelError
    from ray_jobs.runtime.pool import run_pool

    with pytest.raises(ModelError) as e:
        run_pool([{"item_id": str(i)} for i in range(4)], _CannotLoad, {}, Resources(concurrency=1, batch_size=2),
                 desc="correlate", stall_s=60)
    assert str(e.value) == "correlate: cannot load diffusion model '/models/sd21': no model_index.json"


def _tag_input(batch, run: str):
    return batch.assign(input_pid=os.getpid(), run=run)


class _TagActor:
    def __call__(self, batch):
        return batch.assign(ok=True, error="", actor_pid=os.getpid())


def test_inputs_are_prepared_in_cpu_tasks_apart_from_the_actors(ray_session):
    """Equal CPU requests would let Ray Data fuse the input step into the actor pool (decoding on the GPU
    actors again); run_pool keeps it a task operator of its own."""
    from diclip.config import Resources
    from ray_jobs.runtime.pool import run_pool

    import warnings

    rows: list[dict] = []
    res = Resources(num_cpus=0.5, prepare_cpus=0.5, concurrency=1, batch_size=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run_pool([{"item_id": str(i)} for i in range(6)], _TagActor, {}, res, desc="t", collect=rows.append,
                       prepare=_tag_input)
    deprecated = [str(w.message) for w in seen if "deprecat" in str(w.message).lower()]
    assert not deprecated, deprecated  # no Ray API that a coming release removes (ray_remote_args_fn, concurrency)
    assert out.rows == 6 and all(r["input_pid"] != r["actor_pid"] for r in rows)
    assert len({r["run"] for r in rows}) == 1 and rows[0]["run"]  # one id per run for the input tasks' caches


def _input_through_an_outage(batch, run: str):
    """An input task whose read meets a store that is away for 0.3 s (a refused connection, as diclip's
    error mapping marks it) and waits it out."""
    from diclip.storage import outages

    back_at = time.monotonic() + 0.3

    def read():
        if time.monotonic() < back_at:
            err = OSError("connection refused")
            err.transient = True
            raise err
        return "bytes"

    outages.retry_transient(read, "s3://store/input.png", 30)
    return batch


class _ReportActor:
    """Reports as the stages' actors do: one row per item, no input columns passed through."""

    def __call__(self, batch):
        from ray_jobs.runtime.item_reports import report_row

        return pd.DataFrame([report_row(i, True) for i in batch["item_id"]])


def test_outages_the_input_tasks_waited_out_are_in_the_recoveries_record(ray_session):
    """The input tasks make no report rows of their own: what they waited out travels with their batches into
    the actors' reports, so the stage's recoveries count it (it was told in their log and then lost)."""
    from diclip.config import Resources
    from ray_jobs.runtime import recoveries
    from ray_jobs.runtime.pool import run_pool

    res = Resources(num_cpus=0.5, prepare_cpus=0.5, concurrency=1, batch_size=2)
    with recoveries.collect() as rec:
        out = run_pool([{"item_id": str(i)} for i in range(6)], _ReportActor, {}, res, desc="t",
                       prepare=_input_through_an_outage)
    assert out.rows == 6 and not out.failures
    assert rec.store_outages == 3  # one per input batch (three batches of two)
    assert rec.store_wait_s >= 3 * 0.3
