"""What ``evaluate`` makes from its committed rows, on the driver: the totals (confusion matrices summed
exactly, never a mean of per-batch mIoUs), ``metrics.json`` and ``report.md``, ``pictures.png``, and the
pseudo-label export with its expected-vs-written count. Rebuilt from the shards at every run, so a resumed
or re-summarised run gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from diclip import storage
from diclip.config import JobSpec
from diclip.data import class_set_for, open_split
from diclip.errors import DiclipError, StageFailed
from diclip.logging import get_logger
from diclip.method import metrics as metriclib
from diclip.storage.commit_index import ID
from ray_jobs.runtime.shards import list_shards
from ray_jobs.stages.evaluate_crf import dense_cm

log = get_logger("ray_jobs.stages.evaluate")
PSEUDO_DIR = ("pseudo_labels", "SegmentationClassAug")
PSEUDO_COUNT = "export.json"  # expected vs written pseudo-labels, next to SegmentationClassAug/
MISSING_SHOWN = 10  # missing ids named in the error; export.json lists them all
PICTURE_CELL = 160  # px per picture cell: large enough to judge a mask, small enough for 8+ rows in one PNG
PICTURE_TITLES = ("image", "ground truth", "CAM (strongest class)", "prediction")
PICTURE_ALPHA = 0.6
"""Class colours are blended over the image (background shows the image, not VOC's black), strongly enough
that the darker VOC colours still read."""
SUMMARY_COLUMNS = [ID, "task", "image_id", "cm_idx", "cm_cnt", "cam_class", "cm_raw_idx", "cm_raw_cnt"]
METRICS_VERSION = 2
"""How ``metrics.json`` summarises the committed rows: 2 averages IoU over the classes with ground truth, as
the reference (1, unversioned: predicted-only classes counted as 0). A complete output summarised another way
is not complete: a re-run rebuilds its summary from the committed rows (no item is recomputed)."""


def metrics_version(out: str) -> int | None:
    """:data:`METRICS_VERSION` of the ``metrics.json`` at ``out`` (1: written before it was recorded)."""
    uri = storage.join(out, "metrics.json")
    return int(storage.read_json(uri).get("metrics_version", 1)) if storage.exists(uri) else None


def committed_rows(out: str, wanted: set[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Summary columns of every committed row of a wanted item (first shard wins, as ``finalize``)."""
    rows: dict[str, dict] = {}
    where: dict[str, str] = {}
    for shard in list_shards(out):
        for r in storage.read_parquet(shard, columns=SUMMARY_COLUMNS).to_pylist():
            if r[ID] in wanted and r[ID] not in rows:
                rows[r[ID]] = r
                where[r[ID]] = shard
    return rows, where


def read_pngs(where: dict[str, str], ids: list[str]) -> dict[str, bytes]:
    """The ``png`` column of the given items, one read per shard."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for i in ids:
        if i in where:
            by_shard[where[i]].add(i)
    out: dict[str, bytes] = {}
    for shard, want in by_shard.items():
        t = storage.read_parquet(shard, columns=[ID, "png"])
        for i, png in zip(t.column(ID).to_pylist(), t.column("png").to_pylist()):
            if i in want and i not in out:
                out[i] = png
    return out


def write_pictures(spec: JobSpec, rows: dict[str, dict], where: dict[str, str], seg_ids: list[str]) -> int:
    """``pictures.png``: image | ground truth | CAM of the strongest present class | prediction."""
    from diclip import viz

    cfg = spec.evaluate
    class_set = class_set_for(spec.data)
    ids = seg_ids[: cfg.num_pictures]
    if not ids:
        return 0
    pngs = read_pngs(where, [f"seg/{i}" for i in ids] + [f"pic/{i}" for i in ids])
    ds = open_split(spec.data, cfg.split)
    grid, labels = [], []
    drawn: set[int] = set()  # class ids in any ground truth or prediction: what the legend lists
    for i in ids:
        try:
            s = ds.load(i)
        except DiclipError as e:
            log.warning("pictures: skipping %s: %s", i, e)
            continue
        pred = pngs.get(f"seg/{i}")
        heat = pngs.get(f"pic/{i}")
        cls = rows.get(f"pic/{i}", {}).get("cam_class", -1)
        pred_mask = viz.decode_mask_png(pred) if pred is not None else None
        for m in (s.mask, pred_mask):
            if m is not None:
                drawn.update(np.unique(m).tolist())
        grid.append([
            s.image,
            viz.overlay(s.image, s.mask, PICTURE_ALPHA) if s.mask is not None else None,
            viz.heat_overlay(s.image, viz.decode_gray_png(heat)) if heat is not None else None,
            viz.overlay(s.image, pred_mask, PICTURE_ALPHA) if pred_mask is not None else None,
        ])
        labels.append(f"{i}" + (f" CAM:{class_set.classes[cls]}" if cls is not None and cls > 0 else ""))
    img = viz.picture_grid(grid, PICTURE_TITLES, PICTURE_CELL, row_labels=labels,
                           legend=viz.class_legend(class_set.classes, drawn))
    storage.write_bytes(storage.join(cfg.output, "pictures.png"), viz.png_bytes(img))
    return len(grid)


def backfill_pseudo_labels(spec: JobSpec, rows: dict[str, dict], where: dict[str, str]) -> int:
    """Write pseudo-label PNGs of committed cam rows that lack one (e.g. the flag was turned on later)."""
    folder = storage.join(spec.evaluate.output, *PSEUDO_DIR)
    have = {u.rsplit("/", 1)[-1] for u in storage.list_files(folder, suffix=".png")}
    missing = [i for i, r in rows.items() if r["task"] == "cam" and f"{r['image_id']}.png" not in have]
    for item_id, png in read_pngs(where, missing).items():
        storage.write_bytes(storage.join(folder, f"{rows[item_id]['image_id']}.png"), png)
    if missing:
        log.info("evaluate: wrote %d pseudo-label PNGs from committed rows", len(missing))
    return sum(1 for r in rows.values() if r["task"] == "cam")


def pseudo_label_export(spec: JobSpec, cam_ids: list[str]) -> dict:
    """Count the pseudo-label PNGs of ``cam_split`` against the ids listed; the count goes to
    ``pseudo_labels/export.json`` (expected, written, every missing id) for whoever trains on them."""
    cfg = spec.evaluate
    folder = storage.join(cfg.output, *PSEUDO_DIR)
    written = {u[len(folder):].strip("/")[: -len(".png")] for u in storage.list_files(folder, suffix=".png")}
    missing = [i for i in cam_ids if i not in written]
    record = {"split": cfg.cam_split, "folder": folder, "expected": len(cam_ids),
              "written": len(cam_ids) - len(missing), "missing": missing}
    storage.write_json(storage.join(cfg.output, PSEUDO_DIR[0], PSEUDO_COUNT), record)
    return record


def require_complete_export(record: dict) -> None:
    """A pseudo-label set with holes would train the next stage on a silently smaller split: refuse it."""
    missing = record["missing"]
    if not missing:
        return
    shown = ", ".join(missing[:MISSING_SHOWN]) + (f" (+{len(missing) - MISSING_SHOWN} more)"
                                                  if len(missing) > MISSING_SHOWN else "")
    raise StageFailed(f"evaluate: pseudo-label export incomplete: {record['written']} of {record['expected']} masks "
                      f"of split {record['split']!r} written to {record['folder']}; missing: {shown}; their items "
                      "failed (see failures.parquet): fix them and run again (written masks are kept)")


def summaries(spec: JobSpec, rows: dict[str, dict]) -> dict:
    class_set = class_set_for(spec.data)
    k = class_set.num_classes
    out = {}
    for task in ("seg", "cam"):
        mine = [r for r in rows.values() if r["task"] == task]
        cm = dense_cm([(r["cm_idx"], r["cm_cnt"]) for r in mine], k)
        s = metriclib.summarize(cm, class_set.classes)
        s.update(images=len(mine), images_with_gt=sum(1 for r in mine if r["cm_idx"]),
                 confusion_matrix=cm.tolist())
        if task == "seg" and any(r.get("cm_raw_idx") for r in mine):  # CRF on: also the logits' own argmax
            raw = metriclib.summarize(dense_cm([(r["cm_raw_idx"], r["cm_raw_cnt"]) for r in mine], k),
                                      class_set.classes)
            s["before_crf"] = {"miou": raw["miou"], "per_class_iou": raw["per_class_iou"],
                               "pixel_accuracy": raw["pixel_accuracy"]}
        out[task] = s
    return out


def all_background_miou(spec: JobSpec, split: str) -> float:
    """mIoU of predicting background everywhere on ``split``: the trivial baseline a CAM or a segmenter
    must beat (mean over the classes present, as :func:`diclip.method.metrics.summarize` averages)."""
    ds = open_split(spec.data, split)
    k = ds.class_set.num_classes
    cm = np.zeros((k, k), np.int64)
    for image_id in ds.ids:
        mask = ds.read_mask(image_id)
        if mask is not None:
            cm += metriclib.confusion_matrix(mask, np.zeros_like(mask), k)
    return float(metriclib.summarize(cm, ds.class_set.classes)["miou"])


def pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.2f}"


def report_markdown(spec: JobSpec, metrics: dict) -> str:
    c = spec.evaluate
    seg, cam = metrics["segmentation"], metrics.get("cam")
    lines = [
        f"# Evaluation of `{c.checkpoint}`", "",
        f"- segmentation: split `{c.split}`, {seg['images']} images ({seg['images_with_gt']} with ground truth); "
        f"scales {list(c.scales)} x {metrics['base_size']} px, flip {c.flip}"
        f"{' (VOC quirk: no flip at 1.0)' if c.voc_flip_quirk else ''}, CRF {c.crf}"
        + (f" (mIoU before CRF: {pct(seg['before_crf']['miou'])}%)" if seg.get("before_crf") else ""),
    ]
    if cam is not None:
        lines.append(f"- CAM pseudo-labels: split `{c.cam_split}`, {cam['images']} images ({cam['images_with_gt']} "
                     f"with ground truth); CAA {c.cam_caa_threshold}, RAR {c.cam_rar_steps} steps, "
                     f"{'adapter' if c.cam_adapter else 'cache retrieval'} CAM, {c.maps} maps")
    from diclip.models.sources import random_models

    randoms = random_models(spec)
    if randoms:  # the demo: say so before anyone reads the table as a result
        lines.append(f"- **random models** ({', '.join(randoms)}): mIoU near 0 is expected; this run checks that "
                     "the pipeline works, not what DiCLIP scores (README: Real data and weights)")
    lines += [f"- failed items: {metrics['failed']}", "",
              "| class | segmentation IoU (%) |" + (" CAM IoU (%) |" if cam else ""),
              "|---|---:|" + ("---:|" if cam else "")]
    for name, v in seg["per_class_iou"].items():
        lines.append(f"| {name} | {pct(v)} |" + (f" {pct(cam['per_class_iou'][name])} |" if cam else ""))
    lines.append(f"| **mIoU** | **{pct(seg['miou'])}** |" + (f" **{pct(cam['miou'])}** |" if cam else ""))
    lines.append(f"| pixel accuracy | {pct(seg['pixel_accuracy'])} |"
                 + (f" {pct(cam['pixel_accuracy'])} |" if cam else ""))
    return "\n".join(lines) + "\n"


def _nan_to_none(obj):
    if isinstance(obj, float) and np.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_metrics(spec: JobSpec, info, base: int, rows: dict[str, dict], failed: int) -> dict:
    """``metrics.json`` (with :data:`METRICS_VERSION`) and ``report.md`` from the committed rows."""
    cfg = spec.evaluate
    sums = summaries(spec, rows)
    metrics = {
        "metrics_version": METRICS_VERSION,
        "checkpoint": cfg.checkpoint, "fingerprint": info.fingerprint, "classes": info.classes,
        "base_size": base, "failed": failed,
        "segmentation": {"split": cfg.split, "scales": list(cfg.scales), "flip": cfg.flip, "crf": cfg.crf,
                         "voc_flip_quirk": cfg.voc_flip_quirk, "work_ratio": cfg.work_ratio, **sums["seg"]},
        "cam": ({"split": cfg.cam_split, "caa_threshold": cfg.cam_caa_threshold, "rar_steps": cfg.cam_rar_steps,
                 "adapter_cam": cfg.cam_adapter, "maps": cfg.maps, **sums["cam"]} if cfg.cam else None),
    }
    metrics = _nan_to_none(metrics)
    storage.write_json(storage.join(cfg.output, "metrics.json"), metrics)
    storage.write_text(storage.join(cfg.output, "report.md"), report_markdown(spec, metrics))
    return metrics
