"""Evaluate throughput: segmentation images/s of the ``evaluate`` stage with 2 actors vs 1.

Both configurations are real ``evaluate`` runs (Ray Data actor pool, exported tiny model, multi-scale +
flip inference, shards and reports) on the same synthetic val split, side by side on one local Ray
instance, each into a fresh output folder. Two rates per run: wall (Ray Data start to the last
result, actor start-up and model loading included) and steady (first actor call's start to the last
call's end, from the actors' own clocks). CAM evaluation and pictures are off, so the numbers are the
segmentation path alone.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from _common import ratio_line, write_result

NUM_IMAGES = 64  # 16 batches of 4: enough calls that both actors stay busy to the end
IMAGE_SIZE = (375, 500)  # a typical VOC image: the full-size upsampling, argmax and PNG encoding cost something
CROP = 320  # the reference's base square: inputs 224/320/384/480 px
SCALES = "[0.7,1.0,1.2,1.5]"  # the reference's four scales, each with its flip
BATCH = 4  # images per actor call (one shard each)
ACTORS = (2, 1)  # the comparison; 2 = the CPU cores of the machine this is meant to run on
WARMUP_IMAGES = 8  # a first short run starts Ray's worker processes, so neither measured run pays for that


def run_config(base: str, actors: int, gpu: bool, limit: int = 0) -> dict:
    from diclip.config import load_spec
    from ray_jobs.stages import evaluate

    spec = load_spec("configs/tiny.yaml", [
        f"output_uri={base}", f"synthesize.num_val={NUM_IMAGES}",
        f"synthesize.image_size=[{IMAGE_SIZE[0]},{IMAGE_SIZE[1]}]",
        "ray.progress_bars=false", f"evaluate.output={base}/evaluate_{actors}_{limit}", "evaluate.cam=false",
        f"evaluate.limit={limit}", f"data.crop_size={CROP}",
        "evaluate.num_pictures=0", f"evaluate.scales={SCALES}", f"evaluate.resources.concurrency={actors}",
        f"evaluate.resources.batch_size={BATCH}", f"evaluate.resources.num_cpus={0.5 if gpu else 1}",
        f"evaluate.resources.num_gpus={1 / max(ACTORS) if gpu else 0}",
    ])
    out = evaluate.run(spec)
    assert out["seg_images"] == (limit or NUM_IMAGES) and out["failed"] == 0, out
    return {"wall_images_per_s": out["seg_images_per_s"], "steady_images_per_s": out["steady_items_per_s"],
            "seconds": out["seconds"], "actors_used": out["actors_used"], "miou": out["seg_miou"],
            "actor_cpu_share": out["actor_cpu_share"],
            "loadavg_1min_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpu", action="store_true", help="actors share one GPU (num_gpus = 1/2 each)")
    args = p.parse_args()
    import torch

    from diclip.config import load_spec
    from diclip.data import get_class_set
    from diclip.inference import build_model, save_export
    from diclip.models.kv_cache import KVCache
    from ray_jobs.stages import synthesize
    from ray_jobs.runtime.ray_session import init_ray

    busy = os.getloadavg()[0]  # other work on the machine before we start (shared CI/dev boxes)
    base = tempfile.mkdtemp(prefix="diclip-bench-evaluate-")
    spec = load_spec("configs/tiny.yaml", [f"output_uri={base}", f"synthesize.num_val={NUM_IMAGES}",
                                           f"synthesize.image_size=[{IMAGE_SIZE[0]},{IMAGE_SIZE[1]}]",
                                           f"data.crop_size={CROP}", "ray.progress_bars=false"])
    synthesize.run(spec)
    classes = list(get_class_set("synthetic").classes)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0] + [c for c in range(1, len(classes)) for _ in range(2)])
    keys = torch.nn.functional.normalize(torch.randn(len(ids), 64, generator=g), dim=-1)
    cache = KVCache(keys, torch.nn.functional.one_hot(ids, len(classes)).float(), {"classes": classes})
    torch.manual_seed(0)
    save_export(spec.evaluate.checkpoint, build_model(spec, cache), spec, cache)
    init_ray(spec)
    run_config(base, max(ACTORS), args.gpu, limit=WARMUP_IMAGES)
    res = {f"{a}_actors": run_config(base, a, args.gpu) for a in ACTORS}
    for a in ACTORS:
        r = res[f"{a}_actors"]
        print(f"{a} actor(s): {r['wall_images_per_s']:.2f} images/s wall, {r['steady_images_per_s']:.2f} steady "
              f"({r['seconds']:.1f} s, {r['actors_used']} actors did work, each got {100 * r['actor_cpu_share']:.0f}% "
              "of a core while computing)")
    two, one = res["2_actors"], res["1_actors"]
    if busy > 0.5 * (os.cpu_count() or 1) or min(r["actor_cpu_share"] for r in res.values()) < 0.8:
        print(f"warning: the machine was busy (load average {busy:.1f} on {os.cpu_count()} CPUs at start) "
              "or the actors got less than 80% of a core: other processes share the cores, so the ratio "
              "understates the scaling")
    assert abs(two["miou"] - one["miou"]) < 1e-4, "2 actors and 1 must agree on the result"
    print(ratio_line("evaluate seg images/s, 2 actors vs 1 (wall)", two["wall_images_per_s"], one["wall_images_per_s"]))
    print(ratio_line("evaluate seg images/s, 2 actors vs 1 (steady)", two["steady_images_per_s"],
                     one["steady_images_per_s"]))
    write_result("evaluate", {"images": NUM_IMAGES, "image_size": list(IMAGE_SIZE), "crop": CROP, "scales": SCALES,
                              "flip": True,
                              "batch": BATCH, "results": res, "loadavg_1min_at_start": round(busy, 2),
                              "two_vs_one_wall": two["wall_images_per_s"] / one["wall_images_per_s"],
                              "two_vs_one_steady": two["steady_images_per_s"] / one["steady_images_per_s"]})
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
