"""diclip.storage against a real object store that goes away and comes back (SeaweedFS).

What a cluster's store does in real weather: a restart refuses connections for seconds, then serves
the same objects again. Every operation waits that out within ``storage.retry_budget_s``, says once that
it waits and once that the store is back, and beyond the budget fails with one line.
"""
from __future__ import annotations

import logging
import threading
import time

import pyarrow as pa
import pytest

from diclip import storage
from diclip.errors import StorageError


def _outage(server, seconds: float) -> threading.Thread:
    """Stop the store now and start it again after ``seconds`` (in the background)."""
    server.stop(grace=2)

    def back():
        time.sleep(seconds)
        server.start()

    t = threading.Thread(target=back, daemon=True)
    t.start()
    return t


@pytest.mark.timeout(240)
def test_every_operation_waits_out_a_store_restart(seaweed, seaweed_bucket, caplog):
    root = storage.join(seaweed_bucket, "run")
    table = pa.table({"item_id": [f"i{k}" for k in range(20)], "v": list(range(20))})
    storage.write_parquet(storage.join(root, "before.parquet"), table)
    storage.write_bytes(storage.join(root, "blob.bin"), b"x" * 100)
    storage.write_json(storage.join(root, "old.json"), {"a": 0})
    before = storage.outage_report()
    ops = {  # each issued while the store is down: it blocks until the store is back, then does its work
        "write": lambda: storage.write_parquet(storage.join(root, "during.parquet"), table) is None,
        "read": lambda: storage.read_bytes(storage.join(root, "blob.bin")) == b"x" * 100,
        "rows": lambda: storage.read_parquet_rows(storage.join(root, "before.parquet"), [3, 1]).column("v").to_pylist()
        == [3, 1],
        "list": lambda: storage.join(root, "before.parquet") in storage.list_files(root, suffix=".parquet"),
        "exists": lambda: storage.exists(storage.join(root, "blob.bin")),
        "json": lambda: storage.write_json(storage.join(root, "m.json"), {"a": 1}) is None,
        "delete": lambda: storage.delete(storage.join(root, "old.json")) is None,
    }
    results: dict[str, object] = {}

    def run(name):
        try:
            results[name] = ops[name]()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            results[name] = e

    with caplog.at_level(logging.WARNING, logger="diclip"):
        restart = _outage(seaweed, 3.0)
        threads = [threading.Thread(target=run, args=(name,)) for name in ops]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        restart.join()
    assert all(v is True for v in results.values()), results
    assert storage.read_parquet(storage.join(root, "during.parquet")).equals(table)
    assert storage.read_json(storage.join(root, "m.json")) == {"a": 1}
    assert not storage.exists(storage.join(root, "old.json"))

    after = storage.outage_report()
    outages = after["count"] - before["count"]
    # one restart, waited out by every operation (a gateway that has just come back may drop one more
    # connection: that is a second, short outage, and is told as one)
    assert outages in (1, 2)
    assert after["waited_s"] - before["waited_s"] >= 3.0
    lines = [r.getMessage() for r in caplog.records if "object store" in r.getMessage()]
    waits = [ln for ln in lines if "not answering" in ln]
    backs = [ln for ln in lines if "answers again" in ln]
    assert len(waits) == len(backs) == outages, lines  # said once per outage, not once per retry or thread
    assert "waiting up to 600 s" in waits[0] and seaweed.endpoint in waits[0]


@pytest.mark.timeout(120)
def test_beyond_the_budget_one_line_names_store_operation_and_wait(seaweed, seaweed_bucket):
    storage.configure(storage.StorageOptions(endpoint_url=seaweed.endpoint, retry_budget_s=3))
    uri = storage.join(seaweed_bucket, "run", "shard.parquet")
    seaweed.stop(grace=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            storage.write_parquet(uri, pa.table({"a": [1]}))
        waited = time.monotonic() - t0
    finally:
        seaweed.start()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot reach object store at {seaweed.endpoint} for {uri}")
    assert "storage.retry_budget_s=3" in msg
    assert 1.0 <= waited <= 10.0  # waited about the budget, then gave up
    assert not storage.exists(uri)  # nothing half-written


def test_answers_are_not_retried(seaweed_bucket):
    """A missing object or bucket is an answer, not an outage: one line at once."""
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="no such object"):
        storage.read_bytes(storage.join(seaweed_bucket, "nope"))
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage.read_bytes("s3://no-such-bucket-here-x/k")
    assert time.monotonic() - t0 < 5


def test_first_contact_is_checked_at_once(seaweed, seaweed_bucket):
    """validate's reachability check does not wait: a wrong endpoint is one line now."""
    storage.configure(storage.StorageOptions(endpoint_url="http://127.0.0.1:9", retry_budget_s=600))
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach object store at http://127.0.0.1:9"):
        storage.check_writable_root(seaweed_bucket)
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(180)
def test_a_filesystem_handed_to_ray_waits_out_a_restart_and_keeps_its_answers(seaweed, seaweed_bucket, tmp_path):
    """Ray Train uploads checkpoints and Ray Data reads shards through a pyarrow filesystem of their own
    calling; the retrying wrapper gives those calls the same patience, and answers stay answers."""
    import pickle

    import pyarrow.fs as pafs

    from diclip.storage.retrying_fs import retrying

    fs = retrying(storage.resolve(seaweed_bucket)[0], budget_s=120)
    fs = pickle.loads(pickle.dumps(fs))  # it travels to Ray Train's controller and workers
    bucket = seaweed_bucket.split("://", 1)[1]
    src = tmp_path / "ckpt"
    src.mkdir()
    for i in range(3):
        (src / f"part{i}.bin").write_bytes(bytes([i]) * 1000)
    restart = _outage(seaweed, 3.0)
    pafs.copy_files(str(src), f"{bucket}/ckpt", destination_filesystem=fs)  # Ray Train's upload call
    restart.join()
    infos = fs.get_file_info(pafs.FileSelector(f"{bucket}/ckpt"))
    assert sorted(i.base_name for i in infos) == ["part0.bin", "part1.bin", "part2.bin"]
    with fs.open_input_stream(f"{bucket}/ckpt/part2.bin") as f:
        assert f.read() == bytes([2]) * 1000
    with pytest.raises(FileNotFoundError):  # an answer: at once, as the type Ray expects
        fs.open_input_stream(f"{bucket}/ckpt/missing.bin")
    assert fs.get_file_info(f"{bucket}/nothing").type == pafs.FileType.NotFound
    assert retrying(pafs.LocalFileSystem()).type_name == "local"


def test_a_flapping_return_is_one_outage_told_once(caplog, monkeypatch):
    """A store coming back answers some connections and drops others for a moment; threads in backoff
    retry at different times. However the successes and failures interleave, it is one outage: told
    once as begun and once as over, when the last waiting operation has its answer."""
    from diclip.storage import outages

    monkeypatch.setattr(outages, "_BACKOFF_FIRST_S", 0.01)
    flaky = OSError("connection refused")
    flaky.transient = True  # what diclip's error mapping marks a refused connection as
    fail_until = {name: time.monotonic() + delay for name, delay in
                  {"a": 0.05, "b": 0.15, "c": 0.3, "d": 0.45}.items()}
    # d's store drops one more connection after a and b already have their answers
    drops = {"d": 2}

    def op(name):
        def call():
            if time.monotonic() < fail_until[name]:
                raise flaky
            if drops.get(name):
                drops[name] -= 1
                raise flaky
            return name
        return call

    before = storage.outage_report()
    results = {}
    with caplog.at_level(logging.WARNING, logger="diclip"):
        threads = [threading.Thread(target=lambda n=n: results.update({n: outages.retry_transient(op(n), n, 5)}))
                   for n in fail_until]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {n: n for n in fail_until}
    after = storage.outage_report()
    assert after["count"] - before["count"] == 1
    assert after["waited_s"] - before["waited_s"] >= 0.4
    lines = [r.getMessage() for r in caplog.records if "object store" in r.getMessage()]
    assert sum("not answering" in ln for ln in lines) == sum("answers again" in ln for ln in lines) == 1, lines


def test_an_operation_that_gives_up_does_not_end_the_wait_of_others(caplog):
    """One operation with a zero budget (a metrics write worth less than the wait) fails at once while
    others still wait: the outage is neither ended nor told anew because of it."""
    from diclip.storage import outages

    flaky = OSError("connection refused")
    flaky.transient = True
    back_at = time.monotonic() + 0.3

    def call():
        if time.monotonic() < back_at:
            raise flaky
        return True

    before = storage.outage_report()
    with caplog.at_level(logging.WARNING, logger="diclip"):
        waiter = threading.Thread(target=lambda: outages.retry_transient(call, "slow", 5))
        waiter.start()
        time.sleep(0.05)
        with pytest.raises(OSError):
            with storage.retry_budget(0):
                outages.retry_transient(call, "metrics")
        waiter.join()
    assert storage.outage_report()["count"] - before["count"] == 1
    lines = [r.getMessage() for r in caplog.records if "object store" in r.getMessage()]
    assert sum("not answering" in ln for ln in lines) == 1, lines
