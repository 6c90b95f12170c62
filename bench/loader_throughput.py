"""Training loader: samples/s one loader task delivers, per-sample reads vs the batched, threaded reads.

Real-size records on a real store: 500x375 JPEGs and correlation rows of the full-size crop bank's size
(qk_fp16 RAR ~832 KB per map, bench/results/crop_fidelity_fullsize.json), written as the correlate stage
writes them (8 rows per shard, one row per row group), read back with :func:`diclip.train.data.load_rows` -
the function the train stage's Ray Data tasks run - over random positions, batch 4 (the reference's
samples per GPU). ``per-sample`` is the previous loader (one image read and one ranged map read after the
other, per sample), kept here as the baseline. Both stores: local disk (CPU-bound) and a moto S3 server
in its own process (a real S3 protocol; moto's Python request handling bounds it, real S3 serves in parallel).

The reference trains at ~0.42 s per step of 4 images on one RTX 4090 (its logs), so 8 GPUs consume ~76
samples/s; the goal is a loader delivering 4x that (~305 samples/s) with the CPUs a GPU node has. Last line:
``loader: X samples/s per task (S3), need Y for 4x 8 GPUs -> Z tasks``.
"""
from __future__ import annotations

import argparse
import io
import math
import tempfile
from contextlib import nullcontext
import time

import numpy as np

from _common import moto_bucket, write_result

IMAGES = 48
BATCH = 4
BATCHES = 24
REF_STEP_S = 0.42  # reference: ~82-84 s per 200 iterations, batch 4, one RTX 4090
RAR_SHAPE = (5, 1600, 26)  # fp16 q and k: 2 x 416,000 B = the full-size bank's ~832 KB per map


def write_data(root: str) -> list[dict]:
    """JPEGs and real-size correlation shards under ``root``; returns the items (uri, shard, row)."""
    import pyarrow as pa
    from PIL import Image

    from diclip import storage
    from diclip.data.map_shards import SCHEMA, pack_npz
    from ray_jobs.runtime.item_reports import report_row
    from ray_jobs.runtime.shards import write_shard

    rng = np.random.default_rng(0)
    items, rows, reports = [], [], []
    small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    for i in range(IMAGES):
        buf = io.BytesIO()
        Image.fromarray(np.roll(small, i, axis=1)).resize((500, 375), Image.BICUBIC).save(buf, "JPEG", quality=90)
        uri = storage.join(root, "JPEGImages", f"img{i:04d}.jpg")
        storage.write_bytes(uri, buf.getvalue())
        rar = pack_npz({"q": rng.standard_normal(RAR_SHAPE).astype(np.float16),
                        "k": rng.standard_normal(RAR_SHAPE).astype(np.float16)})
        rows.append({"item_id": f"img{i:04d}", "split": "train", "src_h": 375, "src_w": 500, "grid_h": 20,
                     "grid_w": 20, "vce_k": 16, "vce_ids": bytes(400), "vce_rows": bytes(16 * 400 * 2),
                     "rar_grid_h": 40, "rar_grid_w": 40, "rar_codec": "qk_fp16", "rar": rar, "crop": -1, "geom": []})
        reports.append(report_row(rows[-1]["item_id"], True))
        items.append({"item_id": rows[-1]["item_id"], "image_uri": uri})
        if len(rows) == 8:
            write_shard(storage.join(root, "correlate"), pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=1,
                        reports=reports)
            for it, rep in zip(items[-8:], reports):
                it.update(corr_shard=storage.join(root, "correlate", rep["shard"]), corr_row=rep["row"])
            rows, reports = [], []
    return items


def batches(items: list[dict], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(BATCHES):
        pick = [items[i] for i in rng.integers(0, len(items), BATCH)]
        out.append({"pos": np.arange(b * BATCH, (b + 1) * BATCH), "item_id": np.array([p["item_id"] for p in pick]),
                    "label": np.zeros((BATCH, 4), np.float32), "image_uri": np.array([p["image_uri"] for p in pick]),
                    "corr_shard": np.array([p["corr_shard"] for p in pick]),
                    "corr_row": np.array([p["corr_row"] for p in pick])})
    return out


def per_sample_loader(batch: dict, **kw) -> dict:
    """The previous loader's I/O pattern: per sample, the image, then its map row, one after the other."""
    from diclip import storage
    from diclip.data.datasets import decode_image
    from diclip.data.transforms import apply_geometry, sample_geometry

    out = []
    for i in range(len(batch["pos"])):
        uri = str(batch["image_uri"][i])
        image = decode_image(storage.read_bytes(uri), uri)
        g = sample_geometry(np.random.default_rng([0, int(batch["pos"][i])]), image.shape[:2], kw["crop"],
                            kw["scale_range"], kw["flip"])
        out.append((apply_geometry(image, g),
                    storage.read_parquet_rows(str(batch["corr_shard"][i]), [int(batch["corr_row"][i])]).to_pylist()))
    return {"n": len(out)}


def rate(fn, bs: list[dict]) -> tuple[float, float]:
    """(samples/s wall, CPU ms per sample) over the batches, after one warm-up batch."""
    kw = dict(crop=320, scale_range=(0.5, 2.0), flip=True, seed=0, with_maps=True)
    fn(bs[0], **kw)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in bs[1:]:
        fn(b, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = BATCH * (len(bs) - 1)
    return n / wall, 1000 * cpu / n


def main() -> None:
    import torch

    from diclip.train.data import load_rows

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpus", type=int, default=8, help="GPUs the loader must keep fed")
    args = p.parse_args()
    torch.set_num_threads(1)
    need = 4 * args.gpus * BATCH / REF_STEP_S
    result: dict = {"need_samples_per_s": need}
    for store in ("local", "s3"):
        with moto_bucket("loader-bench") if store == "s3" else nullcontext() as s3:
            root = "s3://loader-bench" if s3 else tempfile.mkdtemp(prefix="diclip-loader-")
            bs = batches(write_data(root), seed=1)
            old, old_cpu = rate(per_sample_loader, bs)
            new, new_cpu = rate(load_rows, bs)
        result[store] = {"per_sample": old, "batched": new, "speedup": new / old, "cpu_ms_per_sample": new_cpu}
        print(f"{store:>5}: per-sample reads {old:6.1f} samples/s, batched+threaded {new:6.1f} samples/s "
              f"({new / old:.2f}x); {new_cpu:.1f} CPU-ms per sample", flush=True)
    r = result["s3"]["batched"]
    cpu_bound = 1000 / result["local"]["cpu_ms_per_sample"]
    result["tasks_needed_s3"] = math.ceil(need / r)
    result["cores_needed_cpu_bound"] = math.ceil(need / cpu_bound)
    write_result("loader_throughput", result)
    print(f"{args.gpus} GPUs at the reference's {REF_STEP_S} s/step consume {need / 4:.0f} samples/s; 4x = {need:.0f}: "
          f"{math.ceil(need / cpu_bound)} CPU cores at {cpu_bound:.0f} samples/s per core "
          f"({math.ceil(need / cpu_bound) / args.gpus:.1f} per GPU)")
    print(f"loader: {r:.0f} samples/s per task (S3), need {need:.0f} for 4x {args.gpus} GPUs -> {math.ceil(need / r)} tasks")


if __name__ == "__main__":
    main()
