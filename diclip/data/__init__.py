"""Datasets: class lists, image-level label files, WSSS-layout readers and a synthetic generator."""
from __future__ import annotations

from diclip.data.classes import (
    COCO_CLASSES,
    VOC_CLASSES,
    SYNTHETIC_CLASSES,
    ClassSet,
    class_identity,
    class_set_for,
    get_class_set,
    known_class_sets,
    load_class_file,
)
from diclip.data.datasets import (
    ClassListMismatch,
    Sample,
    SegDataset,
    cached_split,
    decode_image,
    decode_mask,
    open_dataset,
    open_split,
)
from diclip.data.labels import load_cls_labels, save_cls_labels
from diclip.data.synthetic import generate_synthetic

__all__ = [
    "COCO_CLASSES",
    "VOC_CLASSES",
    "SYNTHETIC_CLASSES",
    "ClassSet",
    "class_identity",
    "class_set_for",
    "get_class_set",
    "known_class_sets",
    "load_class_file",
    "ClassListMismatch",
    "Sample",
    "SegDataset",
    "decode_image",
    "decode_mask",
    "open_dataset",
    "open_split",
    "cached_split",
    "load_cls_labels",
    "save_cls_labels",
    "generate_synthetic",
]
