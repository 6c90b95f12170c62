"""Stage ``correlate``: diffusion attention + ACR for every dataset image, once, into compact shards.

The reference runs a Stable Diffusion pass inside every training step; here a Ray Data actor pool
(one diffusers pipeline per actor, GPU fp16 when present) extracts each image's maps once:

    dataset ids -> Ray Dataset -> map_batches(Correlator) -> shards/part-*.parquet + manifest.json

Images of ``correlate.splits`` are extracted whole: by default resized to the ``data.crop_size`` square
(aspect not kept) exactly as the reference's validation and CAM evaluation resize them before their
Stable Diffusion pass, so the stored maps are the ones the reference computes there; with
``whole_image: aspect``, aspect kept with both sides multiples of the patch (longest side <= max_side).
The shard records the CLIP grid and the RAR grid; evaluation reads square maps as they are and training
without a bank resamples them to each crop. With ``correlate.crops_per_image = K`` the training split also gets the per-crop map bank
(:mod:`diclip.data.crop_bank`): K seeded training crops per image, each extracted as the crop itself,
with its geometry stored so training reproduces the crop's pixels. ``preview.png`` draws a few stored
maps (ACR clusters, centre-token rows) over their images; where the dataset has masks, each map panel is
captioned with the share of the objects' tokens' attention that stays in their object vs the area share.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image

from diclip.config import JobSpec
from diclip.data import cached_split, open_split
from diclip.data.map_shards import BANK_COLUMNS, SCHEMA, pack_npz
from diclip.errors import DiclipError
from diclip.logging import get_logger
from diclip.method.codecs import get_codec
from diclip.method.resample import resize_grid
from diclip.storage.commit_index import ID
from ray_jobs.runtime.ray_session import start_actor, setup_process
from ray_jobs.runtime.item_reports import item_error, report_row
from ray_jobs.runtime.shards import write_shard
from ray_jobs.runtime import pool_stage
from ray_jobs.runtime.pool_stage import PoolStage
from ray_jobs.runtime.lineage import (
    call_batched, data_identity, diffusion_input_settings, settings_match, stale_keys,
)

log = get_logger("ray_jobs.stages.correlate")
STAGE = "correlate"
INDEX_COLUMNS = BANK_COLUMNS  # kept in the commit index: training builds its bank index from it alone


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
    """One item per distinct image id over the configured splits, then K crop items per image of the
    bank's split (row ids ``{image}@crop{k}``)."""
    from diclip.data.crop_bank import crop_item_id

    cfg = spec.correlate
    seen: set[str] = set()
    items = []
    for split in cfg.splits:
        ds = open_split(spec.data, split)
        for i in ds.ids:
            if i not in seen:
                seen.add(i)
                items.append({ID: i, "split": split, "image": i, "crop": -1})
    if cfg.crops_per_image:
        for i in open_split(spec.data, cfg.crop_split).ids:
            for k in range(cfg.crops_per_image):
                items.append({ID: crop_item_id(i, k), "split": cfg.crop_split, "image": i, "crop": k})
    return items


def settings(spec: JobSpec) -> dict:
    """What the stored maps depend on, besides the item list (a change makes them stale)."""
    c, d, m = spec.correlate, spec.model.diffusion, spec.method
    return {"rar_codec": get_codec(c.rar_codec).name, "whole_image": c.whole_image,
            "max_side": c.max_side if c.whole_image == "aspect" else None, "diffusion": d.source,
            "diffusion_seed": d.seed, "steps": d.num_inference_steps, "timestep_index": d.timestep_index,
            "vce_layer": d.vce_layer, "rar_layer": d.rar_layer, "heads": list(d.heads), "dtype": d.dtype,
            "corr_threshold": m.corr_threshold, "num_clusters": m.num_clusters, "cluster_iters": m.cluster_iters,
            "acr_precision": m.acr_precision, "crop_size": spec.data.crop_size,
            "rescale_range": list(spec.data.rescale_range), "flip": spec.data.flip, "crop_seed": c.crop_seed,
            "data": data_identity(spec), "diffusion_input": diffusion_input_settings(spec)}


def is_complete(spec: JobSpec) -> bool:
    """Manifest present, made with these settings (``settings.json``), covering these splits and crops."""
    from diclip import storage

    c = spec.correlate
    m = storage.read_manifest(c.output)
    if m is None or not settings_match(c.output, settings(spec)):
        return False
    e = m.extra
    return (set(c.splits) <= set(e.get("splits", []))
            and e.get("crops_per_image", 0) >= c.crops_per_image
            and (not c.crops_per_image or e.get("crop_split") == c.crop_split))


def prepare_one(spec: JobSpec, patch: int, image_id: str, split: str, crop: int,
                run: str) -> tuple[tuple[int, int], np.ndarray, list[int]]:
    """(source size, model input at its extraction size, geometry array or [] for whole images).

    The input is uint8 [H, W, 3], or float32 in [0, 1] for square whole images: the reference's
    validation feeds SD the float bilinear resize, so rounding it to uint8 would change the maps."""
    from diclip.data.crop_bank import bank_geometry, geometry_to_array
    from diclip.data.datasets import decode_image
    from diclip.data.transforms import apply_geometry

    ds = cached_split(spec.data, split, scope=run)
    img = decode_image(ds.read_image_bytes(image_id), ds.image_uri(image_id))
    if crop < 0 and spec.correlate.whole_image == "square":
        from diclip.inference import resize_square

        return img.shape[:2], resize_square(img, spec.data.crop_size).permute(1, 2, 0).numpy(), []
    if crop < 0:
        h, w = resize_grid(img.shape[:2], patch, spec.correlate.max_side)
        return img.shape[:2], np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)), []
    d = spec.data
    geom = bank_geometry(image_id, crop, img.shape[:2], d.crop_size, tuple(d.rescale_range), d.flip,
                         spec.correlate.crop_seed)
    return img.shape[:2], apply_geometry(img, geom), geometry_to_array(geom)


def prepare_inputs(batch: pd.DataFrame, spec: JobSpec, patch: int, run: str) -> pd.DataFrame:
    """Ray Data CPU task ahead of the actor pool: read, decode and resize (or crop) every item's image to
    the model's input, so the (GPU) actors only run models. A bad image becomes ``prep_error``, not a crash.
    ``run`` (the run's id) scopes the per-process split cache."""
    setup_process(spec)
    cols: dict[str, list] = {k: [] for k in ("x", "x_h", "x_w", "x_float", "src_h", "src_w", "geom", "prep_error")}
    for image_id, split, crop in zip(batch["image"], batch["split"], batch["crop"]):
        try:
            src, x, geom = prepare_one(spec, patch, str(image_id), str(split), int(crop), run)
            err = ""
        except Exception as e:  # bad images and decoder/IO surprises are per-item failures, not fatal
            src, x, geom, err = (0, 0), np.zeros((0, 0, 3), np.uint8), [], item_error(e)
        for k, v in (("x", np.ascontiguousarray(x).tobytes()), ("x_h", x.shape[0]), ("x_w", x.shape[1]),
                     ("x_float", x.dtype == np.float32),
                     ("src_h", src[0]), ("src_w", src[1]), ("geom", geom), ("prep_error", err)):
            cols[k].append(v)
    return batch.assign(**cols)


class Correlator:
    """Ray Data actor: one diffusion pipeline, loaded once; each call writes one shard.

    Its inputs arrive decoded and resized by :func:`prepare_inputs` tasks."""

    def __init__(self, spec: JobSpec, patch: int):
        from diclip.models.attention_capture import DiffusionAttention
        from diclip.models.diffusion import build_diffusion_from_config, maybe_enable_xformers

        self.spec = spec
        self.cfg = spec.correlate
        self.device = start_actor(spec, self.cfg.resources)
        pipe = build_diffusion_from_config(spec.model.diffusion, self.device)
        maybe_enable_xformers(pipe, spec.model.diffusion.enable_xformers)
        self.patch = patch  # from the driver: reading it here would import open_clip into every actor (~2.5 s)
        self.diff = DiffusionAttention(pipe, spec.model.diffusion, self.patch, mean=spec.model.clip.mean,
                                       std=spec.model.clip.std)
        self.codec = get_codec(self.cfg.rar_codec)

    def extract(self, members: list[tuple]) -> list[dict]:
        """Maps of same-size inputs (item, split, source size, input, crop, geometry) -> shard rows."""
        from diclip.models.diffusion_maps import noise_seed, vce_compact

        x = torch.from_numpy(np.stack([m[3] for m in members])).permute(0, 3, 1, 2)
        images = x if x.is_floating_point() else x.float() / 255.0
        seeds = [noise_seed(m[0], self.spec.model.diffusion.seed) for m in members]
        cap = self.diff(images, seeds)
        comp = vce_compact(cap, self.spec.method, self.spec.model.diffusion)
        rows = []
        for b, (item_id, split, src, _, crop, geom) in enumerate(members):
            k = int(comp.ids[b].max()) + 1
            rar = self.codec.encode(cap.rar_q[b].cpu(), cap.rar_k[b].cpu(), cap.rar_scale)
            rows.append({
                ID: item_id, "split": split, "src_h": src[0], "src_w": src[1],
                "grid_h": cap.clip_grid[0], "grid_w": cap.clip_grid[1], "vce_k": k,
                "vce_ids": comp.ids[b].cpu().numpy().astype(np.uint8).tobytes(),
                "vce_rows": comp.rows[b, :k].cpu().numpy().astype(np.float16).tobytes(),
                "rar_grid_h": cap.rar_grid[0], "rar_grid_w": cap.rar_grid[1],
                "rar_codec": self.codec.name, "rar": pack_npz(rar), "crop": crop, "geom": geom,
            })
        return rows

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        reports, groups = [], defaultdict(list)
        for it in batch.to_dict("records"):
            if it["prep_error"]:
                reports.append(report_row(it[ID], False, it["prep_error"]))
                continue
            x = np.frombuffer(it["x"], np.float32 if it["x_float"] else np.uint8).reshape(
                int(it["x_h"]), int(it["x_w"]), 3)
            groups[(x.shape[:2], x.dtype.str)].append((it[ID], it["split"], (int(it["src_h"]), int(it["src_w"])), x,
                                        int(it["crop"]), [int(v) for v in it["geom"]]))
        rows = []
        for members in groups.values():
            # the batched UNet call falls back to one image at a time, so one bad item (or an OOM on a big
            # batch) fails alone instead of taking the batch with it
            results = call_batched(lambda *cols: self.extract(list(zip(*cols))), [list(c) for c in zip(*members)],
                                   STAGE)
            for m, res in zip(members, results):
                if isinstance(res, Exception):
                    reports.append(report_row(m[0], False, item_error(res)))
                else:
                    rows.append(res)
                    reports.append(report_row(m[0], True))
        if rows:
            # one row per row group: training fetches single images' maps with one ranged read
            write_shard(self.cfg.output, pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=1,
                        reports=reports, index_columns=INDEX_COLUMNS)
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
    from diclip.data.map_shards import batch_maps

    size = image.shape[:2]
    vce, rar = batch_maps([rec], None, None, None)
    clusters = viz.colorize(_upsample((rec.vce_ids.reshape(rec.grid) % 20 + 1), size, nearest=True))
    return [image, clusters,
            viz.heat_overlay(image, _upsample(centre_row(vce[0], rec.grid), size, nearest=False)),
            viz.heat_overlay(image, _upsample(centre_row(rar[0], rec.rar_grid), size, nearest=False))]


def write_preview(spec: JobSpec, items: list[dict]) -> int:
    """``preview.png`` for the first ``correlate.num_pictures`` committed images; returns rows drawn."""
    from diclip import storage, viz
    from diclip.data.map_shards import CorrelationStore
    from diclip.data.datasets import decode_image

    from diclip.data.crop_bank import bank_geometry
    from diclip.data.transforms import apply_geometry

    cfg = spec.correlate
    store = CorrelationStore(cfg.output)
    chosen = [it for it in items if it["crop"] < 0 and it[ID] in store][: cfg.num_pictures]
    chosen += [it for it in items if it["crop"] >= 0 and it[ID] in store][: cfg.num_pictures - len(chosen)]
    splits: dict[str, object] = {}
    grid, labels, captions = [], [], []
    for it in chosen:
        try:
            if it["split"] not in splits:
                splits[it["split"]] = open_split(spec.data, it["split"])
            ds = splits[it["split"]]
            image = decode_image(ds.read_image_bytes(it["image"]), ds.image_uri(it["image"]))
            if it["crop"] >= 0:  # what the bank extracted from: the crop itself
                d = spec.data
                image = apply_geometry(image, bank_geometry(it["image"], it["crop"], image.shape[:2], d.crop_size,
                                                            tuple(d.rescale_range), d.flip, cfg.crop_seed))
            rec = store.get([it[ID]])[0]
        except DiclipError as e:
            log.warning("correlate preview: skipping %s: %s", it[ID], e)
            continue
        grid.append(preview_columns(image, rec))
        labels.append(f"{it[ID]} k={rec.vce_rows.shape[0]}")
        try:  # with a ground-truth mask, the map panels say how much attention stays in the object vs chance
            mask = ds.read_mask(it["image"]) if it["crop"] < 0 else None
        except DiclipError:
            mask = None
        captions.append(viz.correlation_captions(rec, mask))
    if grid:
        img = viz.picture_grid(grid, PREVIEW_TITLES, PREVIEW_CELL, row_labels=labels, captions=captions)
        storage.write_bytes(storage.join(cfg.output, "preview.png"), viz.png_bytes(img))
    return len(grid)


def stale(spec: JobSpec) -> list[str]:
    """Settings that changed since the committed maps were made (``validate`` lists them)."""
    return stale_keys(spec.correlate.output, settings(spec))


POOL = PoolStage(STAGE, "maps", "extract", Correlator, prepare=prepare_inputs, index_columns=tuple(INDEX_COLUMNS))


def run(spec: JobSpec) -> dict:
    cfg = spec.correlate
    items = list_items(spec)
    # the settings are claimed before any map is extracted: maps of an interrupted or failed run with other
    # settings are dropped then, never mixed with new ones
    patch = clip_patch_size(spec)
    run = pool_stage.start(spec, POOL, cfg, items, settings(spec), ctor_kwargs={"spec": spec, "patch": patch},
                           prepare_kwargs={"spec": spec, "patch": patch},
                           detail=f" ({cfg.crops_per_image} crops per {cfg.crop_split} image)")
    models = {"diffusion": spec.model.diffusion.source, "clip_patch": str(patch)}
    manifest = run.commit(spec, models, {
        "rar_codec": get_codec(cfg.rar_codec).name, "splits": list(cfg.splits), "whole_image": cfg.whole_image,
        "max_side": cfg.max_side, "crops_per_image": cfg.crops_per_image, "crop_split": cfg.crop_split,
        "settings": settings(spec), "settings_hash": run.settings_hash})
    if cfg.num_pictures and write_preview(spec, items):
        log.info("correlate: example maps in %s", cfg.output.rstrip("/") + "/preview.png")
    out = run.summary(manifest, "extracted_now")
    log.info("correlate: %d maps committed, %d failed, %.2f maps/s this run",
             manifest.num_items, manifest.num_failed, out["images_per_s"])
    return out
