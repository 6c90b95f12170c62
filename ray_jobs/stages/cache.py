"""Stage ``cache``: CLIP features inside the generated images' masks -> per-class k-means -> KV cache.

    map:    kept masks -> Ray Dataset -> map_batches(KeyExtractor) -> shards/part-*.parquet
            (per image: one foreground key, the mean CAM-space feature over the tokens inside its mask,
             and one background key from the tokens outside)
    reduce: feature shards read in Ray Data tasks -> one row per key (group = class id, 0 for background)
            -> groupby(group).map_groups(k-means) -> centroids -> kv_cache.safetensors + kv_cache.json
    commit: manifest.json (last)

Features live in exactly the space the CAMs use: the VCE encoder's surgery-path tokens with the
image's own VCE map from a diffusion pass (as at training time), normalised over the token axis like
``DiCLIP.forward``. k-means runs per class with ``clusters_per_class`` centroids (VOC 10, COCO 5) and on
the background keys with ``background_clusters`` (25); a group with fewer points keeps every point.
Rows are sorted by item id inside each group and k-means is seeded with ``seed + group``, so the cache
is identical across runs whatever order the shuffle delivers. The keys are not re-normalised
(reference). A re-run re-uses committed feature shards and only recomputes the reduce.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from diclip import storage
from diclip.config import JobSpec, to_dict
from diclip.data import class_identity, class_set_for
from diclip.data.datasets import decode_image, decode_mask
from diclip.errors import DataError, DiclipError
from diclip.logging import get_logger
from diclip.models.kv_cache import CACHE_FILE, KVCache, save_cache
from diclip.storage.manifest import config_hash
from diclip.storage.commit_index import ID
from ray_jobs.runtime.ray_session import init_ray, setup_process, start_actor
from ray_jobs.runtime.shards import list_shards, write_shard
from ray_jobs.runtime.item_reports import item_error, report_row, short_error
from ray_jobs.runtime import pool_stage
from ray_jobs.runtime.pool_stage import PoolStage
from ray_jobs.runtime.lineage import (
    INPUTS, call_batched, clip_model_id, fingerprint, locate_rows, model_settings, read_located,
    recorded_hash, same_source, settings_match,
)

log = get_logger("ray_jobs.stages.cache")
STAGE = "cache"
BACKGROUND = 0

SCHEMA = pa.schema([
    (ID, pa.string()),
    ("class_id", pa.int32()),
    ("fg_key", pa.list_(pa.float32())),
    ("bg_key", pa.list_(pa.float32())),
    ("fg_tokens", pa.int32()),
    ("bg_tokens", pa.int32()),
])


def output_uri(spec: JobSpec) -> str:
    return spec.cache.output


def settings(spec: JobSpec) -> dict:
    """What determines a feature row: models, VCE settings, size, and which images and masks (the settings
    they were made with)."""
    c = spec.cache
    return {"dataset": class_identity(spec.data), "model": model_settings(spec), "image_size": c.image_size,
            "method": {k: getattr(spec.method, k) for k in ("vce", "corr_threshold", "num_clusters", "cluster_iters")},
            INPUTS: {"generate": recorded_hash(c.images), "mask": recorded_hash(c.masks)}}


def reduce_settings(spec: JobSpec) -> dict:
    c = spec.cache
    return {"clusters_per_class": c.clusters_per_class, "background_clusters": c.background_clusters,
            "kmeans_iters": c.kmeans_iters, "kmeans_inits": c.kmeans_inits, "seed": c.seed}


def stale(spec: JobSpec) -> list[str]:
    """Settings that changed since the committed cache rows were made (``validate`` lists them)."""
    from ray_jobs.runtime.lineage import stale_keys

    return stale_keys(spec.cache.output, settings(spec))


def is_complete(spec: JobSpec) -> bool:
    """Manifest and cache present, same settings, and the masks/images it was built from unchanged."""
    c = spec.cache
    m = storage.read_manifest(c.output)
    return (m is not None and storage.exists(storage.join(c.output, CACHE_FILE))
            and m.extra.get("reduce") == reduce_settings(spec) and settings_match(c.output, settings(spec))
            and same_source(m.extra.get("sources", {}).get("mask"), fingerprint(c.masks))
            and same_source(m.extra.get("sources", {}).get("generate"), fingerprint(c.images)))


def list_items(spec: JobSpec) -> tuple[list[dict], list[tuple[str, str]]]:
    """Kept masks joined with their generated images; (items, failures for masks without an image)."""
    masks = locate_rows(spec.cache.masks, [ID, "class_id", "kept"], "cache.masks")
    images = {r[ID]: r for r in locate_rows(spec.cache.images, [ID], "cache.images")}
    items, missing = [], []
    for m in masks:
        if not m["kept"]:
            continue
        img = images.get(m[ID])
        if img is None:
            missing.append((m[ID], f"no generated image {m[ID]} in {spec.cache.images}"))
            continue
        items.append({ID: m[ID], "class_id": int(m["class_id"]), "img_shard": img["shard"], "img_row": img["row"],
                      "mask_shard": m["shard"], "mask_row": m["row"]})
    return items, missing


# ----------------------------------------------------------------------------------------------
# map: keys per image
# ----------------------------------------------------------------------------------------------
def masked_keys(feats: torch.Tensor, mask: np.ndarray, grid: tuple[int, int]):
    """Mean feature inside / outside a label mask nearest-resized to the token grid (any foreground).

    feats [N, C] patch tokens; returns (fg key or None, bg key or None, fg tokens, bg tokens).
    """
    m = torch.from_numpy(np.array(mask, dtype=np.float32))[None, None]
    inside = (F.interpolate(m, size=tuple(grid), mode="nearest")[0, 0].flatten() > 0).to(feats.device)
    n_fg = int(inside.sum())
    n_bg = int(inside.numel() - n_fg)
    fg = feats[inside].mean(0) if n_fg else None
    bg = feats[~inside].mean(0) if n_bg else None
    return fg, bg, n_fg, n_bg


class KeyExtractor:
    """Ray Data actor: diffusion (VCE) + CLIP loaded once; each call writes one feature shard."""

    def __init__(self, spec: JobSpec):
        self.cfg = spec.cache
        self.device = start_actor(spec, self.cfg.resources)
        from diclip.models.cam_masks import VCEFeatureExtractor

        self.extractor = VCEFeatureExtractor(spec, self.device)

    def keys(self, images: list[np.ndarray], masks: list[np.ndarray], ids: list[str]) -> list[tuple]:
        from diclip.models.cam_masks import to_square_batch

        out = self.extractor(to_square_batch(images, self.cfg.image_size), ids)
        feats = out.features[:, 1:].float()
        return [masked_keys(feats[b], masks[b], out.vision.grid) for b in range(len(ids))]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        items = batch.to_dict("records")
        try:
            imgs = read_located(items, "img_shard", "img_row", ["image"])
            masks = read_located(items, "mask_shard", "mask_row", ["mask"])
        except DiclipError as e:
            return pd.DataFrame([report_row(it[ID], False, item_error(e)) for it in items])
        reports, ok, images, labels = [], [], [], []
        for it in items:
            try:
                img = decode_image(imgs[it[ID]]["image"], f"generated image {it[ID]}")
                label = decode_mask(masks[it[ID]]["mask"], f"mask {it[ID]}")
            except DiclipError as e:
                reports.append(report_row(it[ID], False, item_error(e)))
                continue
            except Exception as e:
                reports.append(report_row(it[ID], False, short_error(e)))
                continue
            images.append(img)
            labels.append(label)
            ok.append(it)
        results = call_batched(self.keys, [images, labels, [it[ID] for it in ok]], STAGE)
        rows = []
        for it, res in zip(ok, results):
            if isinstance(res, Exception):
                reports.append(report_row(it[ID], False, short_error(res)))
                continue
            fg, bg, n_fg, n_bg = res
            rows.append({ID: it[ID], "class_id": int(it["class_id"]),
                         "fg_key": None if fg is None else fg.cpu().numpy().astype(np.float32).tolist(),
                         "bg_key": None if bg is None else bg.cpu().numpy().astype(np.float32).tolist(),
                         "fg_tokens": n_fg, "bg_tokens": n_bg})
            reports.append(report_row(it[ID], True))
        if rows:
            write_shard(self.cfg.output, pa.Table.from_pylist(rows, schema=SCHEMA), reports=reports)
        return pd.DataFrame(reports)


# ----------------------------------------------------------------------------------------------
# reduce: k-means per group with Ray Data
# ----------------------------------------------------------------------------------------------
def explode_keys(batch: pd.DataFrame, keep: list[str] | None = None) -> pd.DataFrame:
    """One row per key: (group, item_id, key); group = class id for foreground keys, 0 for background."""
    allowed = set(keep) if keep is not None else None
    groups, ids, keys = [], [], []
    for iid, cid, fg, bg in zip(batch[ID], batch["class_id"], batch["fg_key"], batch["bg_key"]):
        if allowed is not None and iid not in allowed:
            continue
        for g, k in ((int(cid), fg), (BACKGROUND, bg)):
            if k is not None and len(k):
                groups.append(g)
                ids.append(str(iid))
                keys.append(np.asarray(k, dtype=np.float32))
    return pd.DataFrame({"group": pd.Series(groups, dtype="int64"), ID: pd.Series(ids, dtype="object"),
                         "key": pd.Series(keys, dtype="object")})


def kmeans_group(df: pd.DataFrame, clusters_per_class: int, background_clusters: int, iters: int,
                 seed: int, inits: int = 10) -> pd.DataFrame:
    """Centroids of one group, independent of the order rows arrive in (sorted by item id first).

    Every group uses the same ``random_state`` (the reference: 0 for each class)."""
    from diclip.method.kmeans import kmeans

    df = df.sort_values(ID, kind="stable").drop_duplicates(ID)
    group = int(df["group"].iloc[0])
    x = np.stack([np.asarray(k, dtype=np.float32) for k in df["key"]])
    k = background_clusters if group == BACKGROUND else clusters_per_class
    if len(x) <= k:  # fewer points than centroids: every point is one (the cache gets fewer entries)
        cents, members = x, np.ones(len(x), dtype=np.int64)
    else:
        cents, assign = kmeans(x, k, iters=iters, seed=seed, n_init=inits)
        members = np.bincount(assign, minlength=len(cents))
    return pd.DataFrame({"group": [group] * len(cents), "rank": np.arange(len(cents)),
                         "centroid": list(cents), "members": members, "points": [len(x)] * len(cents)})


KEY_COLUMNS = [ID, "class_id", "fg_key", "bg_key"]


def read_keys(batch: pd.DataFrame, spec: JobSpec, keep: list[str] | None = None) -> pd.DataFrame:
    """Ray Data task: the batch's feature shards (``shard``: URIs), read through :mod:`diclip.storage` (which
    waits out store outages), one row per key (:func:`explode_keys`)."""
    setup_process(spec)
    frames = [explode_keys(storage.read_parquet(uri, columns=KEY_COLUMNS).to_pandas(), keep)
              for uri in batch["shard"]]
    return pd.concat(frames, ignore_index=True) if frames else explode_keys(pd.DataFrame(columns=KEY_COLUMNS))


def reduce_to_centroids(spec: JobSpec, shards: list[str], keep: list[str], num_groups: int) -> list[dict]:
    """The distributed reduce: read feature shards, explode keys, groupby group, k-means per group.

    The shards are listed in the manifest, so tasks read them by URI: Ray Data's Parquet reader would list
    and footer-scan them first (a fleet of up to 32 footer-reader actors, each a new process, per read) -
    seconds of a small run's reduce, for files whose names and rows the stage already knows."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    c = spec.cache
    ctx = ray.data.DataContext.get_current()
    previous = ctx.shuffle_strategy
    # the Dataset copies the current context when created, so set the strategy around the whole plan
    ctx.shuffle_strategy = (ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if c.reduce_shuffle == "sort"
                            else ShuffleStrategy.HASH_SHUFFLE)
    try:
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=min(len(shards), 256))
        ds = ds.map_batches(read_keys, batch_format="pandas", batch_size=1, fn_kwargs={"spec": spec, "keep": keep})
        parts = c.reduce_partitions or max(1, min(64, num_groups))
        out = ds.groupby("group", num_partitions=parts).map_groups(
            kmeans_group, batch_format="pandas",
            fn_kwargs={"clusters_per_class": c.clusters_per_class, "background_clusters": c.background_clusters,
                       "iters": c.kmeans_iters, "seed": c.seed, "inits": c.kmeans_inits})
        return out.take_all()
    finally:
        ctx.shuffle_strategy = previous


def build_cache(spec: JobSpec, rows: list[dict], card: dict[str, Any]) -> KVCache:
    """Sorted centroids -> keys [N, C] float32 and one-hot values [N, K] (column 0 = background)."""
    classes = class_set_for(spec.data).classes
    rows = sorted(rows, key=lambda r: (int(r["group"]), int(r["rank"])))
    keys = torch.from_numpy(np.stack([np.asarray(r["centroid"], dtype=np.float32) for r in rows]))
    groups = torch.tensor([int(r["group"]) for r in rows])
    values = F.one_hot(groups, len(classes)).float()
    return KVCache(keys.contiguous(), values, card)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def cache_card(spec: JobSpec, classes: list[str], counts: dict, sources: dict, s_hash: str,
               missing_classes: list[str], no_fg_tokens: int) -> dict[str, Any]:
    """What the cache file says about itself: its classes and counts, the generate and mask outputs (and
    their models) it was built from, the feature space and reduce settings."""
    c = spec.cache
    mask_m = storage.read_manifest(c.masks)
    gen_m = storage.read_manifest(c.images)
    return {
        "classes": list(classes),
        "counts": counts,
        "sources": {"generate": {**(sources["generate"] or {}), "models": gen_m.models if gen_m else {}},
                    "mask": {**(sources["mask"] or {}), "models": mask_m.models if mask_m else {}}},
        "models": {"clip": clip_model_id(spec), "vce_diffusion": spec.model.diffusion.source,
                   "generation": (gen_m.models.get("diffusion") if gen_m else None)},
        "feature_space": "VCE surgery-path CLIP tokens normalised over the token axis (DiCLIP.forward)",
        "image_size": c.image_size,
        "reduce": reduce_settings(spec),
        "config_hash": config_hash(to_dict(c)),
        "settings_hash": s_hash,
        "missing_classes": missing_classes,
        "images_without_foreground_tokens": no_fg_tokens,
    }


POOL = PoolStage(STAGE, "kept masks", "featurise", KeyExtractor, desc="cache keys")


def run(spec: JobSpec) -> dict:
    c = spec.cache
    class_set = class_set_for(spec.data)
    sources = {"generate": fingerprint(c.images), "mask": fingerprint(c.masks)}
    items, missing = list_items(spec)
    run = pool_stage.start(spec, POOL, c, items, settings(spec))
    t0, s_hash, result = run.started, run.settings_hash, run.result
    for iid, err in missing:
        log.warning("cache: %s failed: %s", iid, err)
    failures = list(missing) + list(result.failures)
    t_map = time.perf_counter() - t0
    init_ray(spec)  # the reduce is a Ray Data job, whether or not any item was pending

    keep = sorted(it[ID] for it in items)
    shards = list_shards(c.output)
    if not shards:
        raise DataError(f"cache: no usable image (kept masks: {len(items)}, failed: {len(failures)}); "
                        "generate more images or relax mask.min_foreground / mask.max_foreground")
    t1 = time.perf_counter()
    rows = reduce_to_centroids(spec, shards, keep, len({it["class_id"] for it in items}) + 1)
    t_reduce = time.perf_counter() - t1
    if not rows:
        raise DataError(f"cache: no keys in the feature shards of {c.output} for the {len(items)} kept masks; "
                        "generate more images or relax mask.min_foreground / mask.max_foreground")

    got = Counter(int(r["group"]) for r in rows)
    points = {int(r["group"]): int(r["points"]) for r in rows}
    missing_classes = [class_set.classes[g] for g in range(class_set.num_classes) if g not in got]
    if missing_classes and not c.allow_missing_classes:
        raise DataError(f"cache: no keys for {', '.join(missing_classes)} (no kept mask with foreground tokens); "
                        "generate more images, relax the mask thresholds, or set cache.allow_missing_classes=true")
    if missing_classes:
        log.warning("cache: no keys for %s; retrieval CAMs of those classes will be undefined", missing_classes)
    counts = {class_set.classes[g]: {"images": points.get(g, 0), "centroids": got.get(g, 0)}
              for g in range(class_set.num_classes)}
    # kept masks whose foreground vanished at token resolution (nearest resize): no foreground key
    no_fg_tokens = len(items) - len(result.failures) - sum(v for g, v in points.items() if g != BACKGROUND)
    card = cache_card(spec, class_set.classes, counts, sources, s_hash, missing_classes, no_fg_tokens)
    cache = build_cache(spec, rows, card)
    card.update(num_entries=cache.num_entries, embed_dim=int(cache.keys.shape[1]))
    if cache.num_entries > spec.model.adapter_size:
        log.warning("cache: %d entries but model.adapter_size is %d; training needs adapter_size >= %d",
                    cache.num_entries, spec.model.adapter_size, cache.num_entries)
    save_cache(c.output, cache)

    extra = {"cache_file": storage.join(c.output, CACHE_FILE), "keys_shape": list(cache.keys.shape),
             "values_shape": list(cache.values.shape), "counts": counts, "sources": sources,
             "reduce": reduce_settings(spec), "settings_hash": s_hash, "missing_classes": missing_classes,
             "images_without_foreground_tokens": no_fg_tokens}
    models = {"clip": clip_model_id(spec), "diffusion": spec.model.diffusion.source}
    manifest = run.commit(spec, models, extra, failures=missing)
    log.info("cache: %d entries x %d dims from %d images (%d failed); map %.1fs, k-means reduce %.1fs",
             cache.num_entries, cache.keys.shape[1], manifest.num_items, manifest.num_failed, t_map, t_reduce)
    return run.summary(manifest, "featurised_now", entries=cache.num_entries, embed_dim=int(cache.keys.shape[1]),
                       map_seconds=round(t_map, 2), reduce_seconds=round(t_reduce, 2))
