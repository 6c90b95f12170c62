"""Stage ``evaluate``: segmentation mIoU, CAM pseudo-label mIoU, pictures and pseudo-label export.

    export (model.safetensors, cache, spec) + dataset splits
    -> items: seg/<id> (``split``), cam/<id> (``cam_split``), pic/<id> (first ``num_pictures`` of ``split``)
    -> Ray Data actor pool (Evaluator: the exported DiCLIP loaded once per actor)
       seg: multi-scale + flip segmenter inference -> mask PNG + confusion matrix; with the dense CRF on
            (``crf_placement=tasks``, the default) the actor returns the working-size fp32 logits instead
       -> Ray Data CPU tasks (:func:`crf_task`, ``crf_cpus`` each, any node): upsample, CRF, mask PNG +
          confusion matrices, one shard per call (``resources.batch_size`` rows) - the CRF spreads over
          every CPU of the cluster (CPU-only workers included) and never holds a GPU
       cam: reference LAM evaluation (CAA 0.88, RAR 10 steps) -> pseudo-label PNG + confusion matrix
       pic: CAM of the strongest present class, for the picture grid
    -> shards/part-*.parquet (one per actor call; confusion matrices stored sparsely per row)
    -> driver: int64 confusion matrices summed over the committed rows (exact; never a mean of
       per-batch mIoUs), metrics.json, report.md, pictures.png,
       [pseudo_labels/SegmentationClassAug/<id>.png + pseudo_labels/export.json: expected vs written; a
       shortfall fails the stage naming the missing ids], failures.parquet, manifest.json (last)

Resumable like every stage: a re-run schedules only items without a committed row, and the totals are
rebuilt from all committed rows. ``settings.json`` - the record every stage keeps
(:func:`ray_jobs.runtime.lineage.claim_settings`) - says what the results depend on (export fingerprint,
scales, thresholds, data root ...); when that changes, the old results are discarded, not mixed in.
Details of the inference itself: :mod:`diclip.inference`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from diclip import storage
from diclip.config import JobSpec
from diclip.data import cached_split, class_identity, class_set_for, open_split
from diclip.errors import ConfigError, DiclipError
from diclip.logging import get_logger
from diclip.method import metrics as metriclib
from diclip.storage.commit_index import ID
from ray_jobs.runtime import lineage, pool_stage
from ray_jobs.runtime.item_reports import item_error, report_row
from ray_jobs.runtime.lineage import call_batched
from ray_jobs.runtime.pool_stage import PoolStage
from ray_jobs.runtime.ray_session import setup_process, start_actor
from ray_jobs.runtime.shards import write_shard
from ray_jobs.stages.evaluate_crf import EMPTY_PAYLOAD, ROW_FORMAT, SCHEMA, crf_payload, crf_task, make_row, seg_row
from ray_jobs.stages.evaluate_report import (
    METRICS_VERSION, PSEUDO_DIR, pct, backfill_pseudo_labels, committed_rows, metrics_version, pseudo_label_export,
    require_complete_export, write_metrics, write_pictures,
)

log = get_logger("ray_jobs.stages.evaluate")
STAGE = "evaluate"


def output_uri(spec: JobSpec) -> str:
    return spec.evaluate.output




def _ids(spec: JobSpec, split: str) -> list[str]:
    ids = open_split(spec.data, split).ids
    return ids[: spec.evaluate.limit] if spec.evaluate.limit else ids


def list_items(spec: JobSpec) -> list[dict]:
    """Every unit of work: one per (task, image)."""
    cfg = spec.evaluate
    seg_ids = _ids(spec, cfg.split)
    items = [{ID: f"seg/{i}", "task": "seg", "image_id": i, "split": cfg.split} for i in seg_ids]
    if cfg.cam:
        pics = seg_ids[: cfg.num_pictures]
        if cfg.maps == "stored" and storage.is_complete(cfg.correlation):
            # the CAM column needs the image's maps; a split without them (COCO's full val) draws none
            from diclip.data.map_shards import CorrelationStore

            store = CorrelationStore(cfg.correlation)
            pics = [i for i in pics if i in store]
        items += [{ID: f"pic/{i}", "task": "pic", "image_id": i, "split": cfg.split} for i in pics]
    if cfg.cam or cfg.export_pseudo_labels:
        items += [{ID: f"cam/{i}", "task": "cam", "image_id": i, "split": cfg.cam_split}
                  for i in _ids(spec, cfg.cam_split)]
    return items


def run_key(spec: JobSpec, fingerprint: str, base_size: int) -> dict:
    """Everything a committed row depends on (not limit / num_pictures / resources: they add or drop rows),
    including which images (a re-drawn synthetic set keeps its ids) and the fingerprint of the stored maps
    read (recomputed maps at the same URI are other inputs)."""
    c = spec.evaluate
    maps = lineage.fingerprint(c.correlation) if c.maps == "stored" else None
    if maps:
        maps.pop("uri", None)
    key = {"checkpoint": c.checkpoint, "fingerprint": fingerprint, "data_root": spec.data.root,
           "dataset": class_identity(spec.data), "split": c.split, "cam_split": c.cam_split, "size": base_size,
           "scales": list(c.scales), "flip": c.flip, "voc_flip_quirk": c.voc_flip_quirk, "work_ratio": c.work_ratio,
           "crf": c.crf, "maps": c.maps, "correlation": c.correlation if c.maps == "stored" else None,
           "correlation_maps": maps, "data": lineage.data_identity(spec),
           "cam_caa_threshold": c.cam_caa_threshold, "cam_rar_steps": c.cam_rar_steps, "cam_adapter": c.cam_adapter,
           "row_format": ROW_FORMAT}
    if c.crf:  # CRF rows since the CRF tasks: upsampled on the CPU in both placements (before: on the device)
        key["crf_upsampling"] = "cpu"
    if c.maps == "online":  # maps made here: how images become the diffusion input counts too
        key["diffusion_input"] = lineage.diffusion_input_settings(spec)
    return key


def current_key(spec: JobSpec) -> dict | None:
    """The run key of this spec (None when the export to evaluate does not exist yet)."""
    from diclip.errors import DiclipError
    from diclip.inference import read_export

    try:
        info = read_export(spec.evaluate.checkpoint)
    except DiclipError:
        return None
    return run_key(spec, info.fingerprint, spec.evaluate.size or info.crop_size)


def is_complete(spec: JobSpec) -> bool:
    """Manifest present and made from this export (its weights' fingerprint) with these settings, and its
    metrics summarised the current way (else a re-run rebuilds them from the committed rows)."""
    out = spec.evaluate.output
    return lineage.complete_with(out, current_key(spec)) and metrics_version(out) == METRICS_VERSION


def stale(spec: JobSpec) -> list[str]:
    key = current_key(spec)
    return lineage.stale_keys(spec.evaluate.output, key) if key is not None else []


# ----------------------------------------------------------------------------------------------
# actor
# ----------------------------------------------------------------------------------------------
def prepare_samples(batch: pd.DataFrame, spec: JobSpec, run: str) -> pd.DataFrame:
    """Ray Data CPU task ahead of the actor pool: read and decode each item's image, mask and label, so the
    (GPU) actors only run the model. A bad item becomes ``prep_error``, not a crash. ``run`` (the run's id)
    scopes the per-process split cache."""
    setup_process(spec)
    cols: dict[str, list] = {k: [] for k in ("img", "img_h", "img_w", "mask", "label", "prep_error")}
    for image_id, split in zip(batch["image_id"], batch["split"]):
        try:
            s = cached_split(spec.data, str(split), scope=run).load(str(image_id))
            vals = (np.ascontiguousarray(s.image).tobytes(), s.image.shape[0], s.image.shape[1],
                    b"" if s.mask is None else np.ascontiguousarray(s.mask).tobytes(), s.label.tolist(), "")
        except Exception as e:  # bad items and decoder/IO surprises fail the item, not the stage
            vals = (b"", 0, 0, b"", [], item_error(e))
        for k, v in zip(cols, vals):
            cols[k].append(v)
    return batch.assign(**cols)


def unpack_sample(item: dict):
    """The :class:`~diclip.data.datasets.Sample` a :func:`prepare_samples` row carries."""
    from diclip.data.datasets import Sample

    h, w = int(item["img_h"]), int(item["img_w"])
    mask = np.frombuffer(item["mask"], np.uint8).reshape(h, w).copy() if len(item["mask"]) else None
    return Sample(id=str(item["image_id"]), image=np.frombuffer(item["img"], np.uint8).reshape(h, w, 3).copy(),
                  label=np.asarray(item["label"], np.float32), mask=mask)


class Evaluator:
    """Ray Data actor: the exported model loaded once; each call writes one shard for its batch.

    Its inputs arrive decoded by :func:`prepare_samples` tasks."""

    def __init__(self, spec: JobSpec, base_size: int):
        from diclip.inference import load_exported_model

        self.spec = spec
        self.cfg = spec.evaluate
        self.device = start_actor(spec, self.cfg.resources)
        self.model, self.model_spec, self.card = load_exported_model(self.cfg.checkpoint, self.device,
                                                                     dataset=class_set_for(spec.data))
        self.base = base_size
        self.cam_size = int(self.card.get("crop_size") or self.model_spec.data.crop_size)  # CAMs at the training crop
        self.patch = self.model.encoder.patch
        self.k = self.model.num_classes
        self.class_set = class_set_for(spec.data)
        self._maps = None
        if self.cfg.crf and not self.crf_in_tasks:  # with crf_placement=tasks the CRF tasks check it
            from diclip.method.crf import crf_backend

            crf_backend()

    @property
    def maps(self):
        if self._maps is None:
            from diclip.inference import MapSource

            self._maps = MapSource(self.cfg.maps, self.model_spec, self.patch, self.device, self.cfg.correlation)
        return self._maps

    def _row(self, item: dict, h: int, w: int, png: bytes, cm: np.ndarray | None = None, cam_class: int = -1,
             cm_raw: np.ndarray | None = None) -> dict:
        return make_row(item, h, w, png, cm, cam_class, cm_raw)

    @property
    def crf_in_tasks(self) -> bool:
        return self.cfg.crf_in_tasks

    def seg_logits(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """The model call of a seg batch: scale- and flip-averaged logits [K, h, w] at the working size."""
        from diclip.inference import multiscale_logits, segmenter_forward, to_tensor

        c = self.cfg
        return multiscale_logits(segmenter_forward(self.model), [to_tensor(im, self.device) for im in images],
                                 self.base, c.scales, c.flip, c.work_ratio, self.patch, c.voc_flip_quirk)

    def segment(self, members: list[tuple[dict, object]]) -> list[dict]:
        """Masks and confusion matrices here in the actor (CRF off, or ``crf_placement=actor``)."""
        from diclip.inference import finish_segment

        crf = self.cfg.crf
        rows = []
        for (item, s), lg in zip(members, self.seg_logits([s.image for _, s in members])):
            pred, raw = finish_segment(s.image, lg, crf)  # with the CRF: upsampled on the CPU, as in the CRF tasks
            rows.append(seg_row(item, s.mask, pred, raw if crf else None, self.k))
        return rows

    def crf_payloads(self, members: list[tuple[dict, object]]) -> list[dict]:
        """The logits of a seg batch for the CRF tasks (``crf_placement=tasks``): fp32 at the working size,
        with the image's pixels and mask as the input tasks decoded them."""
        return [crf_payload(item, lg.float().cpu().numpy())
                for (item, _), lg in zip(members, self.seg_logits([s.image for _, s in members]))]

    def cams(self, members: list[tuple[dict, object]]) -> list[dict]:
        from diclip.inference import cam_pseudo_labels, resize_square, strongest_class
        from diclip.viz import encode_gray_png, encode_mask_png

        c = self.cfg
        size = self.cam_size
        ids = [s.id for _, s in members]
        images = torch.stack([resize_square(s.image, size, self.device) for _, s in members])
        labels = torch.from_numpy(np.stack([s.label for _, s in members])).float().to(self.device)
        corr, rar, rar_grid = self.maps(ids, images, [s.image.shape[:2] for _, s in members])
        results = cam_pseudo_labels(self.model, images, labels, corr, rar, rar_grid,
                                    [s.image.shape[:2] for _, s in members], caa_threshold=c.cam_caa_threshold,
                                    rar_steps=c.cam_rar_steps, use_adapter_cam=c.cam_adapter)
        rows = []
        for (item, s), res in zip(members, results):
            h, w = res.label.shape
            if item["task"] == "pic":
                cls = strongest_class(res.scores, s.label, self.model_spec.method.label_threshold)
                heat = res.scores[cls - 1] if cls > 0 else np.zeros((h, w), np.float32)
                rows.append(self._row(item, h, w, encode_gray_png(heat), cam_class=cls))
                continue
            png = encode_mask_png(res.label)
            if c.export_pseudo_labels:  # before the shard commits the row: a committed row implies its PNG
                storage.write_bytes(storage.join(c.output, *PSEUDO_DIR, f"{s.id}.png"), png)
            cm = metriclib.confusion_matrix(s.mask, res.label, self.k) if s.mask is not None else None
            rows.append(self._row(item, h, w, png, cm))
        return rows

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t_start, cpu_start = time.time(), time.process_time()
        reports: list[dict] = []
        groups: dict[str, list] = defaultdict(list)
        for item in batch.to_dict("records"):
            try:
                if item["task"] in ("cam", "pic") and not self.maps.has(item["image_id"]):
                    raise DiclipError(f"no correlation map for {item['image_id']!r} in {self.cfg.correlation}; "
                                      f"run correlate over split {item['split']!r} or set evaluate.maps=online")
                if item["prep_error"]:
                    raise DiclipError(item["prep_error"])
                sample = unpack_sample(item)
                groups["seg" if item["task"] == "seg" else "cam"].append((item, sample))
            except Exception as e:  # bad items and decoder/IO surprises fail the item, not the stage
                reports.append(report_row(item[ID], False, item_error(e)) | {"task": item["task"]})
        rows: list[dict] = []
        pending: list[dict] = []  # seg items whose CRF runs in a CRF task
        for kind, members in groups.items():
            if kind == "seg" and self.crf_in_tasks:
                results = call_batched(lambda ms: self.crf_payloads(ms), [members], f"{STAGE} {kind}")
                for (it, _), res in zip(members, results):
                    if isinstance(res, Exception):
                        reports.append(report_row(it[ID], False, item_error(res)) | {"task": it["task"]})
                    else:
                        pending.append(res)
                continue
            fn = self.segment if kind == "seg" else self.cams
            # batched, falling back to one item at a time: one bad item (or an OOM) fails alone
            results = call_batched(lambda ms: fn(ms), [members], f"{STAGE} {kind}")
            for (it, _), res in zip(members, results):
                if isinstance(res, Exception):
                    reports.append(report_row(it[ID], False, item_error(res)) | {"task": it["task"]})
                else:
                    rows.append(res)
                    reports.append(report_row(res[ID], True) | {"task": res["task"]})
        if rows:
            write_shard(self.cfg.output, pa.Table.from_pylist(rows, schema=SCHEMA), reports=reports)
        if self.crf_in_tasks:  # every row carries the payload columns, so each output block has one schema
            reports = [EMPTY_PAYLOAD | r for r in reports] + pending
        out = pd.DataFrame(reports)
        out["pid"] = os.getpid()  # which actor did the work (the summary counts actors that contributed)
        out["t_start"], out["t_end"] = t_start, time.time()  # compute span, for throughput without start-up
        out["cpu_s"] = (time.process_time() - cpu_start) / len(out)  # CPU this call used, per item
        return out


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def check_inputs(spec: JobSpec):
    """(export info, base size): one-line errors before any actor starts."""
    from diclip.inference import read_export

    cfg = spec.evaluate
    info = read_export(cfg.checkpoint, class_set_for(spec.data))
    if cfg.crf:
        from diclip.method.crf import crf_backend

        crf_backend()
    if (cfg.cam or cfg.export_pseudo_labels) and cfg.maps == "stored" and not storage.is_complete(cfg.correlation):
        raise ConfigError(f"evaluate.correlation: no complete correlate output at {cfg.correlation} (CAMs need the "
                          f"diffusion maps of split {cfg.cam_split!r}); run the correlate stage first, or set "
                          "evaluate.maps=online, or evaluate.cam=false")
    return info, cfg.size or info.crop_size


@dataclasses.dataclass
class PoolStats:
    """What the driver gathers from the report rows of one run (for the stage's summary)."""

    counts: dict = dataclasses.field(default_factory=lambda: defaultdict(int))
    pids: set = dataclasses.field(default_factory=set)
    span: list = dataclasses.field(default_factory=lambda: [float("inf"), 0.0])
    cpu_s: float = 0.0
    moved: list = dataclasses.field(default_factory=lambda: [0, 0])  # payload bytes handed to CRF tasks, images

    def collect(self, row: dict) -> None:
        self.pids.add(int(row.get("pid", -1)))
        if row.get("moved_bytes") == row.get("moved_bytes") and row.get("moved_bytes") is not None:  # not NaN
            self.moved[0] += int(row["moved_bytes"])
            self.moved[1] += 1
        self.cpu_s += float(row.get("cpu_s", 0.0))
        self.span[0], self.span[1] = min(self.span[0], row.get("t_start", self.span[0])), \
            max(self.span[1], row.get("t_end", self.span[1]))
        if row.get("ok"):
            self.counts[str(row.get("task"))] += 1


POOL = PoolStage(STAGE, "items", "run", Evaluator, prepare=prepare_samples)


def run(spec: JobSpec) -> dict:
    cfg = spec.evaluate
    info, base = check_inputs(spec)
    items = list_items(spec)
    wanted = {it[ID] for it in items}
    stats = PoolStats()
    count = {task: sum(it["task"] == task for it in items) for task in ("seg", "cam", "pic")}
    run = pool_stage.start(
        spec, POOL, cfg, items, run_key(spec, info.fingerprint, base), also_drop=[PSEUDO_DIR[0]],
        ctor_kwargs={"spec": spec, "base_size": base}, prepare_kwargs={"spec": spec},
        detail=f" ({count['seg']} seg, {count['cam']} cam, {count['pic']} pictures)",
        pending=lambda todo: [it for it in todo if it[ID] not in committed_rows(cfg.output, wanted)[0]],
        collect=stats.collect, finish=crf_task if cfg.crf_in_tasks else None,
        finish_kwargs={"spec": spec, "num_classes": len(info.classes)}, finish_cpus=cfg.crf_cpus,
        finish_concurrency=cfg.crf_concurrency)
    rows, where = committed_rows(cfg.output, wanted)
    metrics = write_metrics(spec, info, base, rows, len(run.result.failures))
    pictures = write_pictures(spec, rows, where, [it["image_id"] for it in items if it["task"] == "seg"])
    export = None
    if cfg.export_pseudo_labels:
        backfill_pseudo_labels(spec, rows, where)
        export = pseudo_label_export(spec, [it["image_id"] for it in items if it["task"] == "cam"])
    pseudo = export["written"] if export else 0
    seg_s, cam_s = metrics["segmentation"], metrics["cam"]
    extra = {"seg_miou": seg_s["miou"], "cam_miou": cam_s["miou"] if cam_s else None, "base_size": base,
             "fingerprint": info.fingerprint, "pictures": pictures, "pseudo_labels": pseudo,
             "pseudo_labels_expected": export["expected"] if export else 0}
    manifest = run.commit(spec, {"export": cfg.checkpoint, "clip": str(info.card.get("clip", ""))}, extra,
                          before_commit=(lambda: require_complete_export(export)) if export else None)
    rate = stats.counts["seg"] / run.result.seconds if run.result.seconds > 0 else 0.0
    log.info("evaluate: seg mIoU %s (%d images), CAM mIoU %s (%d images), %d failed; %.2f seg images/s this run",
             pct(seg_s["miou"]), seg_s["images"], pct(cam_s["miou"]) if cam_s else "-",
             cam_s["images"] if cam_s else 0, manifest.num_failed, rate)
    return {"seg_miou": seg_s["miou"], "cam_miou": cam_s["miou"] if cam_s else None,
            "seg_images": seg_s["images"], "cam_images": cam_s["images"] if cam_s else 0,
            "computed_now": run.result.rows, "actors_used": len(stats.pids), "failed": manifest.num_failed,
            "seg_images_per_s": round(rate, 3), **throughput(stats, len(run.pending)),
            "pictures": pictures, "pseudo_labels": pseudo, "seconds": round(time.perf_counter() - run.started, 1)}


def throughput(stats: PoolStats, pending: int) -> dict:
    """Items/s from the first actor call's start to the last call's end (without Ray/actor start-up), the
    actors' CPU share of that span, and the payload per image handed to CRF tasks."""
    span = stats.span[1] - stats.span[0]
    return {"steady_items_per_s": round(pending / span, 3) if span > 0 else 0.0,
            "actor_cpu_share": round(stats.cpu_s / (len(stats.pids) * span), 3) if span > 0 else 0.0,
            "crf_moved_bytes_per_image": round(stats.moved[0] / stats.moved[1]) if stats.moved[1] else 0}
