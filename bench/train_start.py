"""Where a short training run's time goes: Ray Train's controller poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``,
Ray's default 2 s) against the 0.25 s the Makefile exports, side by side in one Ray session.

A run of the tiny spec (1 worker, 6 steps, online maps, 3 validations) trains for ~3 s; the rest is the
worker group's start and end, which the controller paces by its poll. Variants alternate so that warm-up
and load fall on both alike; the first run of the session (cold workers) is left out. Prints the median run
seconds per variant and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _common import ROOT  # noqa: F401  (puts the repository on the path)

VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
ARGS = ["train.max_iters=6", "train.eval_every=2", "train.log_every=1", "train.val_limit=2", "train.warmup_iters=1",
        "train.mode=online", "train.num_workers=1", "ray.progress_bars=false"]


def one_run(root: str, poll: str) -> float:
    from diclip.data import get_class_set
    from diclip.models.kv_cache import save_cache
    from ray_jobs import pipeline
    from ray_jobs.stages import synthesize
    from tests.helpers import random_cache, tiny_spec

    spec = tiny_spec(root, *ARGS)
    synthesize.run(spec)
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
    os.environ[VAR] = poll  # read when the trainer starts its controller (Ray Train propagates it)
    t0 = time.perf_counter()
    pipeline.run_stage(spec, "train")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per variant (after one warm-up run)")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    variants = {"2.0": [], "0.25": []}
    with tempfile.TemporaryDirectory() as tmp:
        one_run(f"{tmp}/warmup", "0.25")
        for i in range(args.runs):
            for poll, times in variants.items():
                times.append(one_run(f"{tmp}/{poll}-{i}", poll))
    ray.shutdown()
    med = {poll: statistics.median(t) for poll, t in variants.items()}
    for poll, times in variants.items():
        print(f"controller poll {poll:>4} s: tiny training run {med[poll]:.1f} s (median of "
              f"{', '.join(f'{t:.1f}' for t in times)})")
    print(f"ratio {med['2.0'] / med['0.25']:.2f}x ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
