"""Stage ``correlate``: diffusion attention + ACR for every dataset image, once, into compact shards.

The reference runs a Stable Diffusion pass inside every training step; here a Ray Data actor pool
(one diffusers pipeline per actor, GPU fp16 when present) extracts each image's maps once:

    dataset ids -> Ray Dataset -> map_batches(Correlator) -> shards/part-*.parquet + manifest.json

Images are extracted whole, resized so both sides are multiples of 16 (longest side <= max_side);
the shard records the CLIP grid and the RAR grid. Training resamples the maps to each crop.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image

from diclip.config import JobSpec
from diclip.data import get_class_set, open_dataset
from diclip.data.correlation import SCHEMA, pack_npz
from diclip.errors import DiclipError
from diclip.logging import get_logger
from diclip.method.codecs import get_codec
from diclip.method.resample import resize_grid
from ray_jobs.common import (
    ID, pending_items, actor_device, finalize, init_ray, report_row, run_pool, setup_process, short_error, write_shard,
)

log = get_logger("ray_jobs.correlate")
STAGE = "correlate"


def output_uri(spec: JobSpec) -> str:
    return spec.correlate.output


def clip_patch_size(spec: JobSpec) -> int:
    import open_clip

    from diclip.models.clip import register_bundled_configs

    register_bundled_configs()
    cfg = open_clip.get_model_config(spec.model.clip.name) or {}
    p = cfg.get("vision_cfg", {}).get("patch_size", 16)
    return int(p[0] if isinstance(p, (list, tuple)) else p)


def dataset_kwargs(spec: JobSpec) -> dict:
    d = spec.data
    return dict(layout=d.layout, labels_file=d.labels_file, list_dir=d.list_dir, mask_dir=d.mask_dir,
                skip_bad=d.skip_bad)


def list_items(spec: JobSpec) -> list[dict]:
    """One item per distinct image id over the configured splits."""
    class_set = get_class_set(spec.data.dataset)
    seen: set[str] = set()
    items = []
    for split in spec.correlate.splits:
        ds = open_dataset(spec.data.root, split, class_set, **dataset_kwargs(spec))
        for i in ds.ids:
            if i not in seen:
                seen.add(i)
                items.append({ID: i, "split": split})
    return items


class Correlator:
    """Ray Data actor: one diffusion pipeline, loaded once; each call writes one shard."""

    def __init__(self, spec: JobSpec):
        setup_process(spec)
        from diclip.models.attention_capture import DiffusionAttention
        from diclip.models.diffusion import build_diffusion_from_config, maybe_enable_xformers

        self.spec = spec
        self.cfg = spec.correlate
        self.device = actor_device(self.cfg.resources)
        torch.set_num_threads(max(1, int(self.cfg.resources.num_cpus)))
        pipe = build_diffusion_from_config(spec.model.diffusion, self.device)
        maybe_enable_xformers(pipe, spec.model.diffusion.enable_xformers)
        self.patch = clip_patch_size(spec)
        self.diff = DiffusionAttention(pipe, spec.model.diffusion, self.patch)
        self.codec = get_codec(self.cfg.rar_codec)
        self.class_set = get_class_set(spec.data.dataset)
        self.datasets: dict[str, object] = {}

    def dataset(self, split: str):
        if split not in self.datasets:
            self.datasets[split] = open_dataset(self.spec.data.root, split, self.class_set, **dataset_kwargs(self.spec))
        return self.datasets[split]

    def load(self, item_id: str, split: str) -> np.ndarray:
        from diclip.data.datasets import decode_image

        ds = self.dataset(split)
        return decode_image(ds.read_image_bytes(item_id), ds.image_uri(item_id))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from diclip.models.correlation import noise_seed, vce_compact

        reports, groups = [], defaultdict(list)
        for item_id, split in zip(batch[ID], batch["split"]):
            try:
                img = self.load(item_id, split)
                size = resize_grid(img.shape[:2], self.patch, self.cfg.max_side)
                groups[size].append((item_id, split, img))
            except DiclipError as e:
                reports.append(report_row(item_id, False, str(e)))
            except Exception as e:  # decoder/IO surprises are per-item failures, not fatal
                reports.append(report_row(item_id, False, short_error(e)))
        rows = []
        for (h, w), members in groups.items():
            x = np.stack([np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)) for _, _, img in members])
            images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
            seeds = [noise_seed(i, self.spec.model.diffusion.seed) for i, _, _ in members]
            cap = self.diff(images, seeds)
            comp = vce_compact(cap, self.spec.method, self.spec.model.diffusion)
            for b, (item_id, split, img) in enumerate(members):
                k = int(comp.ids[b].max()) + 1
                rar = self.codec.encode(cap.rar_q[b].cpu(), cap.rar_k[b].cpu(), cap.rar_scale)
                rows.append({
                    ID: item_id, "split": split, "src_h": img.shape[0], "src_w": img.shape[1],
                    "grid_h": cap.clip_grid[0], "grid_w": cap.clip_grid[1], "vce_k": k,
                    "vce_ids": comp.ids[b].cpu().numpy().astype(np.uint8).tobytes(),
                    "vce_rows": comp.rows[b, :k].cpu().numpy().astype(np.float16).tobytes(),
                    "rar_grid_h": cap.rar_grid[0], "rar_grid_w": cap.rar_grid[1],
                    "rar_codec": self.codec.name, "rar": pack_npz(rar),
                })
                reports.append(report_row(item_id, True))
        if rows:
            # one row per row group: training fetches single images' maps with one ranged read
            write_shard(self.cfg.output, pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=1)
        return pd.DataFrame(reports)


def run(spec: JobSpec) -> dict:
    cfg = spec.correlate
    items = list_items(spec)
    pending = pending_items(items, cfg.output)
    log.info("correlate: %d images, %d already in committed shards, %d to extract (%d actors x batch %d, %s)",
             len(items), len(items) - len(pending), len(pending), cfg.resources.concurrency,
             cfg.resources.batch_size, "GPU" if cfg.resources.num_gpus else "CPU")
    if pending:
        init_ray(spec)
    t0 = time.perf_counter()
    result = run_pool(pending, Correlator, {"spec": spec}, cfg.resources, desc="correlate")
    for item_id, err in result.failures:
        log.warning("correlate: %s failed: %s", item_id, err)
    models = {"diffusion": spec.model.diffusion.source, "clip_patch": str(clip_patch_size(spec))}
    manifest = finalize(cfg.output, STAGE, spec, cfg, result.failures, models,
                        extra={"rar_codec": get_codec(cfg.rar_codec).name, "splits": list(cfg.splits),
                               "max_side": cfg.max_side})
    rate = result.items_per_s
    log.info("correlate: %d images committed, %d failed, %.2f images/s this run",
             manifest.num_items, manifest.num_failed, rate)
    return {"images": manifest.num_items, "failed": manifest.num_failed, "extracted_now": result.rows,
            "images_per_s": round(rate, 3), "seconds": round(time.perf_counter() - t0, 1)}
