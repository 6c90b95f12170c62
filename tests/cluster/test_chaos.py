"""Chaos on a real multi-node cluster: a worker node lost in the middle of a Ray Data stage and of training,
with the artifacts on a real object store (SeaweedFS) and nodes that share nothing but the bucket.

The node is SIGKILLed whole (raylet and every worker on it), as a preempted VM; for training a replacement
node joins afterwards, as an autoscaler would add one. Goal: the same run finishes without a person, no item
lost or duplicated, at most one checkpoint interval of steps redone, and the recovery on record.
"""
from __future__ import annotations

import os

import pytest

from tests.chaos import (CORRELATE, TRAIN, Injector, checkpoint_registered, driver_until, run_stage_with,
                          shards_at_least)
from tests.helpers import random_cache, tiny_spec
from tests.multinode import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(seaweed):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    c = LocalCluster(workers=2, cpus=1.0)
    try:
        c.start()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.stop()


def _spec(cluster, seaweed, bucket, *overrides):
    from ray_jobs.stages import synthesize

    spec = tiny_spec(f"{bucket}/run", *overrides, f"ray.address={cluster.gcs}", "ray.stall_minutes=5",
                     endpoint_url=seaweed.endpoint)
    synthesize.run(spec)
    return spec


def test_worker_nodes_share_no_disk_with_the_driver(cluster, tmp_path):
    """The worker nodes have a /tmp of their own, as nodes of a real cluster have their own disks: what the
    driver writes there, a worker does not see, and the other way round - so a stage that passes the
    chaos tests below cannot be leaning on a shared local folder."""
    import ray

    if not cluster.private_tmp:
        pytest.skip("this host allows no private mount namespace (unshare --mount)")
    marker = tmp_path / "written-by-the-driver"
    marker.write_text("driver")

    def look(path: str) -> tuple[bool, str, str]:
        import os
        import tempfile

        with tempfile.NamedTemporaryFile(dir="/tmp", delete=False) as f:  # a worker's own scratch file
            f.write(b"worker")
        return os.path.exists(path), f.name, ray.get_runtime_context().get_node_id()

    if ray.is_initialized():
        ray.shutdown()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=cluster.gcs, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(look)
        # one task pinned to each worker node (SPREAD is best effort: on a loaded host the node whose worker
        # started first took every task)
        workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        seen = ray.get([remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(str(marker)) for node in workers])
    finally:
        ray.shutdown()
    assert len({node for _, _, node in seen}) == 2  # both worker nodes answered
    assert not any(exists for exists, _, _ in seen)  # the driver's /tmp file is not on any worker
    assert not any(os.path.exists(name) for _, name, _ in seen)  # nor a worker's on the driver's host


def test_a_node_lost_mid_correlate_costs_no_item(cluster, seaweed, seaweed_bucket):
    spec = _spec(cluster, seaweed, seaweed_bucket, *CORRELATE)
    victim = {}

    def kill():
        node = cluster.node_running("Correlator")
        assert node is not None, "no node runs the correlate actor"
        victim["ip"] = node.ip
        cluster.kill(node)

    out = run_stage_with(spec, "correlate", "node lost", Injector(shards_at_least(spec, 2), kill,
                                                                  after=cluster.add_worker))
    assert victim, "the fault never fired"
    assert out.finished, out.error
    assert out.lost == 0 and out.duplicated == 0, out
    assert out.recoveries.get("nodes_lost") == [victim["ip"]], out.recoveries  # the recovery is on record


def test_a_node_lost_mid_training_resumes_from_the_checkpoint(cluster, seaweed, seaweed_bucket):
    from diclip.data import get_class_set
    from diclip.models.kv_cache import save_cache

    spec = _spec(cluster, seaweed, seaweed_bucket, *TRAIN)
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))

    def kill():
        node = cluster.node_running("RayTrainWorker")
        assert node is not None, "no node runs a train worker"
        cluster.kill(node)

    out = run_stage_with(spec, "train", "node lost", Injector(checkpoint_registered(spec), kill,
                                                               after=cluster.add_worker))
    assert out.finished, out.error
    assert out.lost == 0 and out.duplicated == 0, out  # every step logged once
    assert out.recoveries.get("worker_group_restarts") == 1, out.recoveries
    assert len(out.recoveries.get("nodes_lost", [])) == 1, out.recoveries
    assert out.steps_redone <= spec.train.eval_every, out  # at most one checkpoint interval


def test_a_stopped_driver_frees_the_cluster_and_the_next_run_finishes_exactly_once(cluster, seaweed, seaweed_bucket,
                                                                                  tmp_path):
    """Stop and resubmit on the cluster: ``diclip stop`` (``ray job stop``) sends the job's driver SIGTERM and,
    a few seconds later, SIGKILL. A driver joined to the cluster gets SIGTERM mid-correlate (whole images plus a
    per-crop bank): it stops in seconds with one line and its actors leave the nodes; a second run's driver is
    killed hard; a third run finishes with every map exactly once."""
    import signal
    import subprocess
    import sys
    import time

    from diclip import storage
    from ray_jobs.runtime.shards import list_shards
    from ray_jobs.runtime.interrupt import MESSAGE
    from tests.helpers import committed_ids

    overrides = ["synthesize.num_train=12", "synthesize.num_val=4", "correlate.resources.batch_size=2",
                 "correlate.resources.concurrency=1", "correlate.crops_per_image=2", "data.crop_size=48"]
    spec = _spec(cluster, seaweed, seaweed_bucket, *overrides)
    root = spec.output_uri
    env = dict(os.environ, DICLIP_LOG_LEVEL="WARNING", RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "diclip.cli", "correlate", "configs/tiny.yaml", f"output_uri={root}",
           f"storage.endpoint_url={seaweed.endpoint}", f"ray.address={cluster.gcs}", "ray.progress_bars=false",
           "synthesize.image_size=[64,80]", "correlate.max_side=80", *overrides]

    def driver_at(shards: int, log: str) -> subprocess.Popen:
        proc = driver_until(cmd, env, shards_at_least(spec, shards), str(tmp_path / log))
        assert len(list_shards(spec.correlate.output)) >= shards, (tmp_path / log).read_text()[-2000:]
        return proc

    proc = driver_at(3, "first.txt")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # the contract: stopped within 30 s
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "first.txt").read_text()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == MESSAGE, err[-2000:]
    deadline = time.monotonic() + 30
    while cluster.node_running("Correlator") is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.node_running("Correlator") is None, "the stopped run's actors still hold the nodes"
    assert not storage.is_complete(spec.correlate.output)
    partial = len(list_shards(spec.correlate.output))
    for s in list_shards(spec.correlate.output):  # every visible shard is complete and readable
        storage.read_parquet(s)

    proc = driver_at(partial + 2, "second.txt")  # killed hard: its last shards were never indexed
    proc.kill()
    proc.wait(timeout=10)
    assert not storage.is_complete(spec.correlate.output)
    partial = len(list_shards(spec.correlate.output))

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = committed_ids(spec.correlate.output)
    want = 16 + 12 * 2  # whole images + (train image, crop) pairs
    assert sorted(ids) == sorted(set(ids)) and len(ids) == want  # every map exactly once, no holes
    assert sum("@crop" in i for i in ids) == 24
    assert len(storage.read_manifest(spec.correlate.output).shards) >= partial
