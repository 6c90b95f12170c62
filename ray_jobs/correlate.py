"""Stage ``correlate``: diffusion attention + ACR for every dataset image, once, into compact shards.

The reference runs a Stable Diffusion pass inside every training step; here a Ray Data actor pool
(one diffusers pipeline per actor, GPU fp16 when present) extracts each image's maps once:

    dataset ids -> Ray Dataset -> map_batches(Correlator) -> shards/part-*.parquet + manifest.json

Images are extracted whole, resized so both sides are multiples of 16 (longest side <= max_side);
the shard records the CLIP grid and the RAR grid. Training resamples the maps to each crop.
``preview.png`` draws a few stored maps (ACR clusters, centre-token rows) over their images.
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
from diclip.data import open_split
from diclip.data.correlation import SCHEMA, pack_npz
from diclip.errors import DiclipError
from diclip.logging import get_logger
from diclip.method.codecs import get_codec
from diclip.method.resample import resize_grid
from ray_jobs.common import (
    ID, pending_items, start_actor, finalize, init_ray, report_row, run_pool, short_error, write_shard,
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


def list_items(spec: JobSpec) -> list[dict]:
    """One item per distinct image id over the configured splits."""
    seen: set[str] = set()
    items = []
    for split in spec.correlate.splits:
        ds = open_split(spec.data, split)
        for i in ds.ids:
            if i not in seen:
                seen.add(i)
                items.append({ID: i, "split": split})
    return items


class Correlator:
    """Ray Data actor: one diffusion pipeline, loaded once; each call writes one shard."""

    def __init__(self, spec: JobSpec):
        from diclip.models.attention_capture import DiffusionAttention
        from diclip.models.diffusion import build_diffusion_from_config, maybe_enable_xformers

        self.spec = spec
        self.cfg = spec.correlate
        self.device = start_actor(spec, self.cfg.resources)
        pipe = build_diffusion_from_config(spec.model.diffusion, self.device)
        maybe_enable_xformers(pipe, spec.model.diffusion.enable_xformers)
        self.patch = clip_patch_size(spec)
        self.diff = DiffusionAttention(pipe, spec.model.diffusion, self.patch)
        self.codec = get_codec(self.cfg.rar_codec)
        self.datasets: dict[str, object] = {}

    def dataset(self, split: str):
        if split not in self.datasets:
            self.datasets[split] = open_split(self.spec.data, split)
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


PREVIEW_TITLES = ("image", "ACR clusters", "VCE map, centre token", "RAR map, centre token")
PREVIEW_CELL = 128


def _upsample(x: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """[h, w] -> [H, W] with PIL (float maps bilinear, label maps nearest)."""
    img = Image.fromarray(x.astype(np.uint8) if nearest else x.astype(np.float32))
    return np.asarray(img.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR))


def centre_row(maps: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Row of the token at the grid centre, as an [h, w] map scaled to [0, 1] (what that token attends to)."""
    h, w = grid
    row = maps[(h // 2) * w + w // 2].reshape(h, w).float()
    lo, hi = row.min(), row.max()
    return ((row - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def preview_columns(image: np.ndarray, rec) -> list[np.ndarray]:
    """image | ACR cluster ids | VCE centre-token row | RAR centre-token row, all at the image size."""
    from diclip import viz
    from diclip.data.correlation import batch_maps

    size = image.shape[:2]
    vce, rar = batch_maps([rec], None, None, None)
    clusters = viz.colorize(_upsample((rec.vce_ids.reshape(rec.grid) % 20 + 1), size, nearest=True))
    return [image, clusters,
            viz.heat_overlay(image, _upsample(centre_row(vce[0], rec.grid), size, nearest=False)),
            viz.heat_overlay(image, _upsample(centre_row(rar[0], rec.rar_grid), size, nearest=False))]


def write_preview(spec: JobSpec, items: list[dict]) -> int:
    """``preview.png`` for the first ``correlate.num_pictures`` committed images; returns rows drawn."""
    from diclip import storage, viz
    from diclip.data.correlation import CorrelationStore
    from diclip.data.datasets import decode_image

    cfg = spec.correlate
    store = CorrelationStore(cfg.output)
    chosen = [it for it in items if it[ID] in store][: cfg.num_pictures]
    splits: dict[str, object] = {}
    grid, labels = [], []
    for it in chosen:
        try:
            if it["split"] not in splits:
                splits[it["split"]] = open_split(spec.data, it["split"])
            ds = splits[it["split"]]
            image = decode_image(ds.read_image_bytes(it[ID]), ds.image_uri(it[ID]))
            rec = store.get([it[ID]])[0]
        except DiclipError as e:
            log.warning("correlate preview: skipping %s: %s", it[ID], e)
            continue
        grid.append(preview_columns(image, rec))
        labels.append(f"{it[ID]} k={rec.vce_rows.shape[0]}")
    if grid:
        img = viz.picture_grid(grid, PREVIEW_TITLES, PREVIEW_CELL, row_labels=labels)
        storage.write_bytes(storage.join(cfg.output, "preview.png"), viz.png_bytes(img))
    return len(grid)


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
    models = {"diffusion": spec.model.diffusion.source, "clip_patch": str(clip_patch_size(spec))}
    manifest = finalize(cfg.output, STAGE, spec, cfg, result.failures, models,
                        extra={"rar_codec": get_codec(cfg.rar_codec).name, "splits": list(cfg.splits),
                               "max_side": cfg.max_side})
    if cfg.num_pictures and write_preview(spec, items):
        log.info("correlate: example maps in %s", cfg.output.rstrip("/") + "/preview.png")
    rate = result.items_per_s
    log.info("correlate: %d images committed, %d failed, %.2f images/s this run",
             manifest.num_items, manifest.num_failed, rate)
    return {"images": manifest.num_items, "failed": manifest.num_failed, "extracted_now": result.rows,
            "images_per_s": round(rate, 3), "seconds": round(time.perf_counter() - t0, 1)}
