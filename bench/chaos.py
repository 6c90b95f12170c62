"""What each fault costs: one stage of the tiny pipeline on a real 3-node Ray cluster (head + two 1-CPU
worker raylets on loopback addresses, nothing shared but the bucket) with a real object store
(SeaweedFS), undisturbed and then with one fault injected mid-stage:

* a worker node lost (SIGKILL of its raylet and every worker on it; a replacement node joins after);
* the object store restarted (down for about 10 s: stop, 4 s away, start);
* correlate's driver stopped (SIGTERM, what ``diclip stop`` / ``ray job stop`` sends first) and the same
  command run again (the resubmit), the stopped run's seconds counted with the rerun's;

and prints, per fault: outcome, items lost, items duplicated, training steps redone, and the extra seconds
over the undisturbed run of the same stage, side by side in one run. Tiny random models: what is measured
is the machinery, not the models. Run: ``.venv/bin/python bench/chaos.py`` (~15 min on 2 cores).
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid

from _common import write_result

from tests.chaos import (CORRELATE, TRAIN, Injector, checkpoint_registered, driver_until, run_stage_with,
                         shards_at_least)
from tests.helpers import random_cache, tiny_overrides, tiny_spec
from tests.multinode import LocalCluster
from tests.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer

DOWN_S = 4.0


def main() -> None:
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    from diclip import storage
    from diclip.data import get_class_set
    from diclip.logging import init_logging
    from diclip.models.kv_cache import save_cache
    from ray_jobs.stages import synthesize

    init_logging("WARNING")
    store = SeaweedServer(tempfile.mkdtemp(prefix="chaos-store-"))
    store.start()
    os.environ["AWS_ENDPOINT_URL"] = store.endpoint
    storage.configure(storage.StorageOptions(endpoint_url=store.endpoint))
    cluster = LocalCluster(workers=2, cpus=1.0).start()

    def spec_for(stage: str):
        bucket = store.create_bucket(f"chaos-{uuid.uuid4().hex[:10]}")
        spec = tiny_spec(f"{bucket}/run", *(CORRELATE if stage == "correlate" else TRAIN), f"ray.address={cluster.gcs}",
                         "ray.stall_minutes=5", endpoint_url=store.endpoint)
        synthesize.run(spec)
        if stage == "train":
            save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
        return spec

    def lose_node(marker: str):
        def fault() -> None:
            node = cluster.node_running(marker)
            if node is None:
                raise RuntimeError(f"no node runs {marker}")
            cluster.kill(node)
        return fault

    def restart_store() -> None:
        store.stop(grace=1)
        time.sleep(DOWN_S)
        store.start()

    def stopped_and_rerun(spec):
        """A driver joined to the cluster (as a submitted job's is) stopped mid-correlate, then run again."""
        import signal
        import sys

        overrides = tiny_overrides(spec.output_uri, *CORRELATE, f"ray.address={cluster.gcs}", "ray.stall_minutes=5",
                                   endpoint_url=store.endpoint)
        cmd = [sys.executable, "-m", "diclip.cli", "correlate", "configs/tiny.yaml", *overrides]
        t0 = time.monotonic()
        proc = driver_until(cmd, dict(os.environ, DICLIP_LOG_LEVEL="ERROR", RAY_AUTH_MODE="disabled"),
                            shards_at_least(spec, 2))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stopped = time.monotonic() - t0
        out = run_stage_with(spec, "correlate", "driver stopped, rerun", None)
        out.seconds += stopped
        out.recoveries = {"stopped_after_s": round(stopped, 1), "exit": proc.returncode, **out.recoveries}
        return out

    rows = []
    try:
        for stage, ready, marker in (("correlate", lambda s: shards_at_least(s, 2), "Correlator"),
                                     ("train", checkpoint_registered, "RayTrainWorker")):
            base = run_stage_with(spec_for(stage), stage, "none", None)
            rows.append(base)
            spec = spec_for(stage)
            rows.append(run_stage_with(spec, stage, "worker node lost",
                                       Injector(ready(spec), lose_node(marker), after=cluster.add_worker)))
            spec = spec_for(stage)
            rows.append(run_stage_with(spec, stage, "store restarted", Injector(ready(spec), restart_store)))
            if stage == "correlate":
                rows.append(stopped_and_rerun(spec_for(stage)))
            for r in rows[-4 if stage == "correlate" else -3:]:
                r.extra = r.seconds - base.seconds  # type: ignore[attr-defined]
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        store.stop()

    header = f"{'stage':<10} {'fault':<22} {'outcome':<9} {'lost':>4} {'dup':>4} {'steps redone':>12} {'seconds':>8} " \
             f"{'extra s':>8}  recoveries"
    print(header)
    for r in rows:
        outcome = "finished" if r.finished else "FAILED"
        print(f"{r.stage:<10} {r.fault:<22} {outcome:<9} {r.lost:>4} {r.duplicated:>4} {r.steps_redone:>12} "
              f"{r.seconds:>8.1f} {r.extra:>8.1f}  {r.recoveries or r.error or '-'}")
    write_result("chaos", {"rows": [dict(r.__dict__) for r in rows]})


if __name__ == "__main__":
    main()
