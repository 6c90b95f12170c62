"""Stage ``mask``: foreground masks for the generated images, with the training-free CAM path.

    generate manifest -> Ray Dataset -> map_batches(MaskActor) -> shards/part-*.parquet + manifest.json

There is no KV cache yet at this point - the cache is built *from* these masks - so the CAM is the
surgery CAM with VCE only (no cache retrieval), refined like the training pseudo-labels: CLIP-affinity
propagation inside CAM boxes, then the RAR random walk (``mask.rar_steps``, reference 10), label map at
the generated image's size with background = 1 - max foreground. The image-level label is the one
class the image was generated for. See :mod:`diclip.models.cam_masks`.

Masks that are empty or cover less than ``mask.min_foreground`` / more than ``mask.max_foreground`` of
the image are kept as rows with ``kept=False`` and a reason, so the ``cache`` stage skips them and the
manifest reports per-class and filtered counts. ``preview.png`` shows a few masks per class (kept and
filtered), because whether a threshold is right is seen faster than read.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pandas as pd
import pyarrow as pa

from diclip import storage
from diclip.config import JobSpec
from diclip.data import class_identity, class_set_for
from diclip.data.datasets import decode_image
from diclip.data.synthetic import encode_mask_png
from diclip.viz import colorize, decode_mask_png, overlay, picture_grid, png_bytes
from diclip.errors import DiclipError
from diclip.logging import get_logger
from diclip.storage.commit_index import ID
from ray_jobs.runtime.ray_session import start_actor
from ray_jobs.runtime.shards import list_shards, write_shard
from ray_jobs.runtime.item_reports import item_error, report_row, short_error
from ray_jobs.runtime import pool_stage
from ray_jobs.runtime.pool_stage import PoolStage
from ray_jobs.runtime.lineage import (
    INPUTS, call_batched, clip_model_id, fingerprint, locate_rows, model_settings, read_located,
    recorded_hash, same_source, settings_match,
)

log = get_logger("ray_jobs.stages.mask")
STAGE = "mask"

SCHEMA = pa.schema([
    (ID, pa.string()),
    ("class_id", pa.int32()),
    ("foreground_fraction", pa.float64()),
    ("kept", pa.bool_()),
    ("reason", pa.string()),
    ("mask", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def output_uri(spec: JobSpec) -> str:
    return spec.mask.output


def settings(spec: JobSpec) -> dict:
    """What determines a mask row (models, method thresholds, filter thresholds, the generate settings the
    images were made with), not resources."""
    m = spec.mask
    return {"dataset": class_identity(spec.data), "model": model_settings(spec),
            "method": {k: getattr(spec.method, k) for k in ("vce", "corr_threshold", "num_clusters", "cluster_iters",
                                                            "caa_threshold", "caa_layers", "label_threshold")},
            "image_size": m.image_size, "rar_steps": m.rar_steps, "min_foreground": m.min_foreground,
            "max_foreground": m.max_foreground, INPUTS: {"generate": recorded_hash(m.images)}}


def filter_reason(fraction: float, lo: float, hi: float) -> str:
    """'' when the mask is kept, else ``code: detail`` (code: empty | too_small | too_large)."""
    if fraction <= 0:
        return "empty: no foreground pixel"
    if fraction < lo:
        return f"too_small: foreground {fraction:.4f} < mask.min_foreground {lo:g}"
    if fraction > hi:
        return f"too_large: foreground {fraction:.4f} > mask.max_foreground {hi:g}"
    return ""


def list_items(spec: JobSpec) -> list[dict]:
    """Every committed generated image, located in its generate shard."""
    rows = locate_rows(spec.mask.images, [ID, "class_id"], "mask.images")
    return [{ID: r[ID], "class_id": int(r["class_id"]), "shard": r["shard"], "row": r["row"]} for r in rows]


def stale(spec: JobSpec) -> list[str]:
    """Settings that changed since the committed mask rows were made (``validate`` lists them)."""
    from ray_jobs.runtime.lineage import stale_keys

    return stale_keys(spec.mask.output, settings(spec))


def is_complete(spec: JobSpec) -> bool:
    """Manifest present, same settings, and the generate output it masked has not changed since."""
    m = storage.read_manifest(spec.mask.output)
    return (m is not None and settings_match(spec.mask.output, settings(spec))
            and same_source(m.extra.get("source"), fingerprint(spec.mask.images)))


class MaskActor:
    """Ray Data actor: CLIP + diffusion loaded once (``TrainingFreeMasker``); one shard per call."""

    def __init__(self, spec: JobSpec):
        self.cfg = spec.mask
        self.device = start_actor(spec, self.cfg.resources)
        from diclip.models.cam_masks import TrainingFreeMasker

        self.masker = TrainingFreeMasker(spec, self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        items = batch.to_dict("records")
        reports, ok_items, images = [], [], []
        try:
            fetched = read_located(items, "shard", "row", ["image"])
        except DiclipError as e:  # a whole shard unreadable: every item of it fails, with the reason
            return pd.DataFrame([report_row(it[ID], False, item_error(e)) for it in items])
        for it in items:
            try:
                images.append(decode_image(fetched[it[ID]]["image"], f"generated image {it[ID]}"))
                ok_items.append(it)
            except DiclipError as e:
                reports.append(report_row(it[ID], False, item_error(e)))
            except Exception as e:
                reports.append(report_row(it[ID], False, short_error(e)))
        masks = call_batched(self.masker, [images, [int(it["class_id"]) for it in ok_items],
                                           [it[ID] for it in ok_items]], STAGE)
        rows = []
        for it, img, mask in zip(ok_items, images, masks):
            if isinstance(mask, Exception):
                reports.append(report_row(it[ID], False, short_error(mask)))
                continue
            frac = float((mask > 0).mean())
            reason = filter_reason(frac, self.cfg.min_foreground, self.cfg.max_foreground)
            rows.append({ID: it[ID], "class_id": int(it["class_id"]), "foreground_fraction": frac,
                         "kept": not reason, "reason": reason, "mask": encode_mask_png(mask),
                         "width": int(img.shape[1]), "height": int(img.shape[0])})
            reports.append(report_row(it[ID], True))
        if rows:
            write_shard(self.cfg.output, pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=1,
                        reports=reports)
        return pd.DataFrame(reports)


def summarize(stage_uri: str, class_names: tuple[str, ...]) -> dict:
    """Per-class image/kept/filtered counts and filtered counts by reason, over all committed rows."""
    seen: set[str] = set()
    per_class: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    for shard in list_shards(stage_uri):  # same order as finalize's dedupe: first shard wins
        t = storage.read_parquet(shard, columns=[ID, "class_id", "kept", "reason"]).to_pylist()
        for r in t:
            if r[ID] in seen:
                continue
            seen.add(r[ID])
            c = per_class[class_names[r["class_id"]]]
            c["images"] += 1
            if r["kept"]:
                c["kept"] += 1
            else:
                c["filtered"] += 1
                reasons[r["reason"].split(":", 1)[0]] += 1
    classes = {k: {"images": v["images"], "kept": v["kept"], "filtered": v["filtered"]}
               for k, v in sorted(per_class.items(), key=lambda kv: class_names.index(kv[0]))}
    return {"per_class": classes, "kept": sum(v["kept"] for v in classes.values()),
            "filtered": sum(reasons.values()), "filtered_by_reason": dict(sorted(reasons.items()))}


PREVIEW_TITLES = ("generated image", "mask overlay", "mask")
PREVIEW_CELL = 128


def preview_rows(stage_uri: str, per_class: int) -> list[dict]:
    """Up to ``per_class`` committed mask rows per class (sorted ids), filtered ones first so they get seen;
    each row carries its ``shard`` and ``row`` for the ranged read of its mask."""
    rows = locate_rows(stage_uri, [ID, "class_id", "kept", "reason", "foreground_fraction"], "mask preview")
    by_class: dict[int, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["kept"], r[ID])):
        if len(by_class[r["class_id"]]) < per_class:
            by_class[r["class_id"]].append(r)
    return [r for c in sorted(by_class) for r in by_class[c]]


def write_preview(spec: JobSpec, class_names: tuple[str, ...]) -> int:
    """``preview.png``: generated image | mask overlay | mask for a few images per class; returns rows drawn."""
    cfg = spec.mask
    if cfg.preview_per_class == 0:
        return 0
    chosen = preview_rows(cfg.output, cfg.preview_per_class)
    want = {r[ID] for r in chosen}
    images = [r for r in locate_rows(cfg.images, [ID], "mask.images") if r[ID] in want]
    masks = read_located(chosen, "shard", "row", ["mask"])
    pics = read_located(images, "shard", "row", ["image"])
    grid, labels = [], []
    for r in chosen:
        if r[ID] not in pics:
            continue
        try:
            img = decode_image(pics[r[ID]]["image"], f"generated image {r[ID]}")
        except DiclipError as e:
            log.warning("mask preview: skipping %s: %s", r[ID], e)
            continue
        mask = decode_mask_png(masks[r[ID]]["mask"])
        grid.append([img, overlay(img, mask), colorize(mask)])
        state = "kept" if r["kept"] else r["reason"].split(":", 1)[0]
        labels.append(f"{class_names[r['class_id']]} {state} {r['foreground_fraction']:.2f}")
    if grid:
        storage.write_bytes(storage.join(cfg.output, "preview.png"),
                            png_bytes(picture_grid(grid, PREVIEW_TITLES, PREVIEW_CELL, row_labels=labels)))
    return len(grid)


POOL = PoolStage(STAGE, "generated images", "mask", MaskActor)


def run(spec: JobSpec) -> dict:
    cfg = spec.mask
    source = fingerprint(cfg.images)
    run = pool_stage.start(spec, POOL, cfg, list_items(spec), settings(spec))
    class_names = class_set_for(spec.data).classes
    counts = summarize(cfg.output, class_names)
    models = {"clip": clip_model_id(spec), "diffusion": spec.model.diffusion.source}
    manifest = run.commit(spec, models, {"source": source, "settings_hash": run.settings_hash, **counts})
    drawn = write_preview(spec, class_names)
    if drawn:
        log.info("mask: %d example masks in %s", drawn, storage.join(cfg.output, "preview.png"))
    out = run.summary(manifest, "masked_now", kept=counts["kept"], filtered=counts["filtered"])
    log.info("mask: %d masks committed (%d kept, %d filtered: %s), %d failed, %.2f images/s this run",
             manifest.num_items, counts["kept"], counts["filtered"], counts["filtered_by_reason"], manifest.num_failed,
             out["images_per_s"])
    return out
