"""The evaluate stage's shard rows and its dense-CRF CPU tasks.

Both places that finish a segmented image - the model actor (CRF off, or ``evaluate.crf_placement=actor``) and
the Ray Data CPU task after the actor pool (:func:`crf_task`, ``crf_placement=tasks``, the default) - build
their rows here, so the two paths write identical rows: :data:`SCHEMA`, :func:`make_row`, :func:`seg_row`.
What an actor hands a CRF task per image is :data:`CRF_PAYLOAD` (flagged :data:`CRF_PENDING`).
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa

from diclip.config import JobSpec
from diclip.method import metrics as metriclib
from diclip.storage.commit_index import ID
from ray_jobs.runtime.item_reports import item_error, report_row
from ray_jobs.runtime.ray_session import setup_process
from ray_jobs.runtime.shards import write_shard

SCHEMA = pa.schema([
    (ID, pa.string()),
    ("task", pa.string()),  # seg | cam | pic
    ("image_id", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("png", pa.binary()),  # seg: predicted mask, cam: pseudo-label (palette PNGs); pic: 8-bit CAM heatmap
    ("cm_idx", pa.list_(pa.int32())),  # sparse confusion matrix: flat index gt * K + pred ...
    ("cm_cnt", pa.list_(pa.int64())),  # ... and its pixel count (empty without ground truth)
    ("cam_class", pa.int16()),  # pic: class id shown (0: no present class)
    ("cm_raw_idx", pa.list_(pa.int32())),  # seg with CRF: the confusion matrix before CRF (the reference
    ("cm_raw_cnt", pa.list_(pa.int64())),  # reports both), empty otherwise
])
ROW_FORMAT = 2
"""Version of the row layout above; part of the run key, so outputs of an older layout are recomputed."""
CRF_PENDING = "crf_pending"
"""Actor output column: True on a seg item whose CRF a :func:`crf_task` still has to run (its logits, image
and mask ride along in the ``CRF_PAYLOAD`` columns); False on report rows the actor completed itself."""
CRF_PAYLOAD = ("crf_logits", "crf_k", "crf_h", "crf_w", "img", "img_h", "img_w", "mask")
"""What an actor hands a CRF task per image: fp32 logits [K, h, w] at the working size (``work_ratio`` x the
image; the exact input of the in-actor path, so masks stay identical), the RGB pixels the CRF's bilateral
term reads and the ground-truth mask. A COCO image (640x480, 81 classes, work ratio 0.2): 3.98 MB of logits +
0.92 MB of pixels + 0.31 MB of mask (``bench/orchestration.py --evaluate-crf`` measures it)."""
EMPTY_PAYLOAD = {CRF_PENDING: False, "crf_logits": b"", "crf_k": 0, "crf_h": 0, "crf_w": 0, "img": b"",
                 "img_h": 0, "img_w": 0, "mask": b""}
"""The payload columns of a report row the actor completed itself: every row of an actor's output carries
them, so each output block has one schema."""
REPORT_KEEP = ("task", "pid", "t_start", "t_end", "cpu_s")
"""Columns of the actor's row a CRF task's report of that item keeps."""


def sparse_cm(cm: np.ndarray) -> tuple[list[int], list[int]]:
    idx = np.flatnonzero(cm)
    return idx.astype(np.int32).tolist(), cm.reshape(-1)[idx].astype(np.int64).tolist()


def dense_cm(rows, k: int) -> np.ndarray:
    """Sum of sparse per-row confusion matrices as an exact int64 [K, K] matrix."""
    flat = np.zeros(k * k, dtype=np.int64)
    for idx, cnt in rows:
        if idx:
            np.add.at(flat, np.asarray(idx, dtype=np.int64), np.asarray(cnt, dtype=np.int64))
    return flat.reshape(k, k)


def make_row(item: dict, h: int, w: int, png: bytes, cm: np.ndarray | None = None, cam_class: int = -1,
             cm_raw: np.ndarray | None = None) -> dict:
    """One shard row (:data:`SCHEMA`)."""
    idx, cnt = sparse_cm(cm) if cm is not None else ([], [])
    raw_idx, raw_cnt = sparse_cm(cm_raw) if cm_raw is not None else ([], [])
    return {ID: item[ID], "task": item["task"], "image_id": item["image_id"], "height": h, "width": w,
            "png": png, "cm_idx": idx, "cm_cnt": cnt, "cam_class": cam_class,
            "cm_raw_idx": raw_idx, "cm_raw_cnt": raw_cnt}


def seg_row(item: dict, mask: np.ndarray | None, pred: np.ndarray, raw: np.ndarray | None, k: int) -> dict:
    """The shard row of a segmented image: its mask PNG, and with ground truth its confusion matrix (and the
    one before CRF when ``raw`` is given)."""
    from diclip.viz import encode_mask_png

    cm = metriclib.confusion_matrix(mask, pred, k) if mask is not None else None
    cm_raw = metriclib.confusion_matrix(mask, raw, k) if mask is not None and raw is not None else None
    return make_row(item, *pred.shape, encode_mask_png(pred), cm, cm_raw=cm_raw)


def crf_payload(item: dict, logits: np.ndarray) -> dict:
    """The output row of a seg item whose CRF a task runs: fp32 logits [K, h, w] at the working size, with
    the image's pixels and mask as the input tasks decoded them (``item``)."""
    arr = np.ascontiguousarray(logits, dtype=np.float32)
    # the report columns too, typed as in every other row (the CRF task writes the item's real report):
    # a block mixing rows with and without them has an ``ok`` column of True and NaN, which Arrow cannot
    # convert (Ray Data then pickles the column and logs a warning per block)
    return {ID: item[ID], "task": item["task"], "image_id": item["image_id"], "ok": True, "error": "",
            "store_outages": 0, "store_wait_s": 0.0, CRF_PENDING: True,
            "crf_logits": arr.tobytes(), "crf_k": arr.shape[0], "crf_h": arr.shape[1], "crf_w": arr.shape[2],
            "img": item["img"], "img_h": int(item["img_h"]), "img_w": int(item["img_w"]), "mask": item["mask"]}


def _is_pending(value) -> bool:
    """The :data:`CRF_PENDING` flag of a row: absent (None) or NaN (a block without the column) is False."""
    return value is not None and value == value and bool(value)


def _finish_one(item: dict, k: int) -> dict:
    """The shard row of one pending seg item: upsample, dense CRF, arg-max."""
    import torch

    from diclip.inference import finish_segment

    h, w = int(item["img_h"]), int(item["img_w"])
    image = np.frombuffer(item["img"], np.uint8).reshape(h, w, 3)
    mask = np.frombuffer(item["mask"], np.uint8).reshape(h, w) if len(item["mask"]) else None
    logits = torch.from_numpy(np.frombuffer(item["crf_logits"], np.float32).reshape(
        int(item["crf_k"]), int(item["crf_h"]), int(item["crf_w"])).copy())
    pred, raw = finish_segment(image, logits, True)
    return seg_row(item, mask, pred, raw, k)


def crf_task(batch: pd.DataFrame, spec: JobSpec, num_classes: int) -> pd.DataFrame:
    """Ray Data CPU task after the actor pool (``crf_placement=tasks``): for each seg item the actor left
    pending, :func:`diclip.inference.finish_segment` (upsample, dense CRF, arg-max) on the logits it shipped,
    then one shard for the call's rows, as an actor call writes one. The actor's own report rows pass
    through. Reports say ``crf_s`` (CPU-side seconds) and ``moved_bytes`` (payload from the actor) per item.
    ``num_classes`` comes from the driver (a classes file is not read again by every task).

    A bad item (a malformed or missing payload) fails alone and is reported once; a node without a dense-CRF
    package fails the task, hence the stage, in one line (:func:`diclip.method.crf.crf_backend`) instead of
    every item. The torch thread count set for the CRF is restored: Ray reuses worker processes."""
    import torch

    from diclip.method.crf import crf_backend

    records = batch.to_dict("records")
    out: list[dict] = []
    pending: list[dict] = []
    for item in records:
        if _is_pending(item.get(CRF_PENDING)):
            pending.append(item)
        else:  # the actor's report row (or a block without the payload columns at all)
            out.append({c: v for c, v in item.items() if c not in CRF_PAYLOAD and c != CRF_PENDING})
    if not pending:
        return pd.DataFrame(out)
    setup_process(spec)
    crf_backend()  # once per task: a node without the package fails here in one line, not item by item
    k = num_classes
    new: list[dict] = []
    rows: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.evaluate.crf_cpus)))
    try:
        for item in pending:
            t0 = time.perf_counter()
            moved = None
            try:
                moved = sum(len(item[c]) for c in ("crf_logits", "img", "mask"))
                rows.append(_finish_one(item, k))
                rep = report_row(item[ID], True)
            except Exception as e:  # one bad item fails alone (a store outage past its budget is raised)
                rep = report_row(item[ID], False, item_error(e))
            new.append(rep | {c: item[c] for c in REPORT_KEEP if c in item}
                       | {"crf_s": time.perf_counter() - t0, "moved_bytes": moved})
    finally:
        torch.set_num_threads(threads)
    if rows:
        write_shard(spec.evaluate.output, pa.Table.from_pylist(rows, schema=SCHEMA), reports=new)
    return pd.DataFrame(out + new)
