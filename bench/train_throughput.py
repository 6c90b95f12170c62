"""Training throughput: samples/s with stored maps vs online diffusion, and 2 workers vs 1.

Each configuration is a real ``train`` stage run (Ray Train + DeepSpeed, tiny models, CPU/gloo) on
the same synthetic data; samples/s is taken from the trainer's own log records after the first
logging interval (so worker start-up, DeepSpeed init and the first Ray Data blocks are excluded).
On a GPU (``--gpu``) the same runs use ``use_gpu`` and fp16/bf16.
"""
from __future__ import annotations

import argparse
import json
import tempfile

from _common import ratio_line, write_result

ITERS = 16  # 4 logging intervals of 4 steps; the first interval is warm-up
CROP = 128  # large enough that maps/UNet cost something, small enough for 2 CPU cores


def run_config(data_root: str, correlate_uri: str, cache_uri: str, mode: str, workers: int, gpu: bool) -> float:
    from diclip import storage
    from diclip.config import load_spec
    from ray_jobs.stages import train

    out = tempfile.mkdtemp(prefix=f"diclip-bench-train-{mode}-{workers}-")
    spec = load_spec("configs/tiny.yaml", [
        f"output_uri={out}", f"data.root={data_root}", f"correlate.output={correlate_uri}", f"cache.output={cache_uri}",
        f"data.crop_size={CROP}", f"train.mode={mode}", f"train.num_workers={workers}", f"train.max_iters={ITERS}",
        "train.log_every=4", f"train.eval_every={ITERS}", "train.val_limit=2", "train.batch_per_worker=2",
        f"train.use_gpu={str(gpu).lower()}", f"train.resources.num_gpus={1 if gpu else 0}", "ray.progress_bars=false",
    ])
    train.run(spec)
    lines = [json.loads(x) for x in storage.read_text(storage.join(spec.train.output, "metrics.jsonl")).splitlines()]
    rates = [r["samples_per_s"] for r in lines if r["step"] > 4 and "samples_per_s" in r]
    return sum(rates) / len(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    from diclip.config import load_spec
    from diclip.data import get_class_set
    from diclip.models.kv_cache import save_cache
    from ray_jobs.stages import correlate, synthesize
    from ray_jobs.runtime.ray_session import init_ray
    from tests.helpers import random_cache

    base = tempfile.mkdtemp(prefix="diclip-bench-train-")
    spec = load_spec("configs/tiny.yaml", [f"output_uri={base}", "synthesize.num_train=24", "synthesize.num_val=4",
                                           f"synthesize.image_size=[{CROP},{CROP}]", f"correlate.max_side={CROP}",
                                           "ray.progress_bars=false"])
    synthesize.run(spec)
    init_ray(spec)
    correlate.run(spec)
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
    res = {}
    for mode, workers in (("stored", 2), ("online", 2), ("stored", 1)):
        res[f"{mode}_{workers}w"] = run_config(spec.data.root, spec.correlate.output, spec.cache.output, mode, workers,
                                               args.gpu)
        print(f"{mode} maps, {workers} worker(s): {res[f'{mode}_{workers}w']:.2f} samples/s")
    print(ratio_line("samples/s stored vs online (2 workers)", res["stored_2w"], res["online_2w"]))
    print(ratio_line("samples/s 2 workers vs 1 (stored)", res["stored_2w"], res["stored_1w"]))
    write_result("train_throughput", {"crop": CROP, "iters": ITERS, "samples_per_s": res,
                                      "stored_vs_online": res["stored_2w"] / res["online_2w"],
                                      "two_vs_one_worker": res["stored_2w"] / res["stored_1w"]})


if __name__ == "__main__":
    main()
