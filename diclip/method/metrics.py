"""Segmentation metrics from a confusion matrix.

The confusion matrix is additive, so workers accumulate their own and the driver sums them: the
reduction is exact (unlike averaging per-batch mIoU). Pixels labelled ``ignore_index`` are skipped.
mIoU is the reference's (``utils/evaluate.scores``): the mean IoU over the classes that have ground-truth
pixels. A class only predicted has IoU 0 in the per-class table but is not in the mean; a class absent from
both has no IoU (NaN). On a full VOC/COCO val set every class has ground truth, so this only matters for
subsets (``evaluate.limit``, small validation sets), where the reference's number is the one to compare.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """[K, K] int64 counts, rows = ground truth, columns = prediction."""
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has {gt.size} pixels, prediction {pred.size}")
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    pred = np.clip(pred[keep], 0, num_classes - 1)
    return np.bincount(gt[keep] * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def summarize(cm: np.ndarray, class_names: list[str] | tuple[str, ...]) -> dict:
    """mIoU (over the classes with ground truth, as the reference), pixel accuracy and per-class IoU (None
    where the class is absent from gt and prediction)."""
    cm = np.asarray(cm)
    iou = iou_per_class(cm)
    total = cm.sum()
    scored = iou[cm.sum(1) > 0]  # rows: ground truth; such a class has a union, so a finite IoU
    return {
        "miou": float(scored.mean()) if scored.size else float("nan"),
        "pixel_accuracy": float(np.diag(cm).sum() / total) if total else float("nan"),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou)},
        "pixels": int(total),
    }


def markdown_table(summary: dict, title: str = "") -> str:
    lines = [f"### {title}" if title else "", "", "| class | IoU (%) |", "|---|---:|"]
    for name, v in summary["per_class_iou"].items():
        lines.append(f"| {name} | {'-' if v is None else f'{100 * v:.2f}'} |")
    lines.append(f"| **mIoU** | **{100 * summary['miou']:.2f}** |")
    lines.append(f"| pixel accuracy | {100 * summary['pixel_accuracy']:.2f} |")
    return "\n".join(lines).strip() + "\n"
