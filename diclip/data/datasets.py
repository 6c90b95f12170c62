"""Readers for the WSSS dataset layout (PASCAL VOC, COCO as WSSS projects lay it out, synthetic).

Everything goes through ``diclip.storage`` so the same code reads local disk and S3. Construction
only reads the split list and the labels file; images and masks are read lazily per id, so a
10k-image split costs two small reads until you iterate it.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from diclip import storage
from diclip.data.classes import ClassSet, class_set_for, get_class_set
from diclip.data.labels import load_cls_labels
from diclip.errors import DataError, StorageError
from diclip.logging import get_logger

log = get_logger("diclip.data.datasets")

LAYOUTS = ("voc", "coco")
IGNORE_INDEX = 255
_COCO_PREFIX = re.compile(r"^COCO_[A-Za-z]+\d{4}_")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_logged_once: set[str] = set()


class ClassListMismatch(DataError):
    """The data does not fit the class list (label width, mask ids): never skipped by skip_bad,
    because every item would be wrong, not just this one."""


@dataclass
class Sample:
    """One decoded dataset item."""

    id: str
    image: np.ndarray  # uint8 HxWx3 RGB
    label: np.ndarray  # float32 [num_classes-1] image-level multi-hot, no background
    mask: np.ndarray | None  # uint8 HxW class ids (0 background, 255 ignore), None without a mask


# EXIF orientation tag -> the PIL transpose that shows the image as viewers do (ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored) of an opened image; 1 when absent or unreadable."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF is not worth failing an image over
        return 1
    return value if value in _EXIF_TRANSPOSE else 1


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an array (image or mask) the way viewers display the image."""
    op = _EXIF_TRANSPOSE.get(int(orientation))
    if op is None:
        return array
    return np.ascontiguousarray(np.asarray(Image.fromarray(array).transpose(op)))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes to uint8 HxWx3 RGB in its displayed orientation (EXIF applied).

    ``name`` (the file) goes in the error. See :func:`decode_image_oriented` for the raw orientation.
    """
    arr, orientation = decode_image_oriented(data, name)
    return orient(arr, orientation)


def decode_image_oriented(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """(uint8 HxWx3 RGB as stored, EXIF orientation tag); ``name`` (the file) goes in the error."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        orientation = exif_orientation(img)
        mode = img.mode
        if mode == "RGB":
            arr = np.asarray(img)
        elif mode.startswith("I;16") or mode in ("I", "F"):
            raw = np.asarray(img)
            if mode.startswith("I;16") or (mode == "I" and raw.max(initial=0) > 255):
                raw = raw.astype(np.float64) / 257.0  # 16-bit range -> 8-bit
            gray = np.clip(np.rint(raw), 0, 255).astype(np.uint8)
            arr = np.repeat(gray[:, :, None], 3, axis=2)
        elif mode == "P" and "transparency" in img.info:
            arr = np.asarray(img.convert("RGBA").convert("RGB"))
        else:  # L, 1, LA, RGBA, P, CMYK, YCbCr, ...: PIL drops alpha when going to RGB
            arr = np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(
            f"cannot decode image {name} ({type(e).__name__}): the file is corrupt or not an "
            "image; replace it, or pass skip_bad=True to skip such items"
        ) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image {name} decoded to shape {arr.shape}, expected HxWx3; replace the file")
    return np.ascontiguousarray(arr, dtype=np.uint8), orientation


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Decode a palette (P) or grayscale (L) PNG to uint8 class ids.

    Palette images are read as their indices; converting them to RGB would turn class ids into
    colours.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        mode = img.mode
        if mode in ("P", "L"):
            arr = np.asarray(img)
        elif mode == "1":
            arr = np.asarray(img).astype(np.uint8)
        elif mode in ("LA", "PA"):
            arr = np.asarray(img.getchannel(0))
        elif mode.startswith("I"):
            arr = np.asarray(img)
        else:
            arr = None
    except Exception as e:
        raise DataError(
            f"cannot decode mask {name} ({type(e).__name__}): the file is corrupt or not an "
            "image; replace it, or pass skip_bad=True to skip such items"
        ) from None
    if arr is None:
        raise DataError(
            f"mask {name} is a {mode} image; expected a palette (P) or grayscale (L) PNG whose "
            "pixel values are class ids: convert colour masks to ids first"
        )
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"mask {name} has values outside 0..255; class ids must fit in uint8")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _parse_split_list(text: str) -> list[str]:
    """One id per line; VOC train_aug lines ("/JPEGImages/x.jpg /SegmentationClassAug/x.png")
    contribute the stem of their first token."""
    ids: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
        if token.lower().endswith(_IMAGE_SUFFIXES):
            token = token.rsplit(".", 1)[0]
        if token:
            ids.append(token)
    return ids


def _is_absolute(uri: str) -> bool:
    return "://" in uri or uri.startswith("/")


def _safe_exists(uri: str) -> bool:
    """``storage.exists`` that treats 'cannot tell' (e.g. a bare S3 prefix) as absent."""
    try:
        return bool(storage.exists(uri))
    except StorageError:
        return False


def _read_or_none(uri: str) -> bytes | None:
    """Bytes of ``uri``, or None when it does not exist; other storage failures propagate so an
    unreachable bucket is never mistaken for a missing (skippable) file."""
    try:
        return storage.read_bytes(uri)
    except (StorageError, FileNotFoundError):
        if storage.exists(uri):
            raise
        return None


class SegDataset:
    """VOC-layout dataset (also COCO as WSSS projects lay it out, and our synthetic data).

    ``layout="voc"``: ``root/JPEGImages/{id}.jpg``, masks in ``root/SegmentationClassAug`` (else
    ``root/SegmentationClass``, or ``mask_dir``). ``layout="coco"``: ``root/JPEGImages/{train|val}/
    {id}.jpg``, masks ``{mask_dir or root/SegmentationClass}/{train|val}/{id minus COCO_xxx2014_}.png``.
    Split lists live in ``{list_dir or root/ImageSets/Segmentation}/{split}.txt``.
    """

    def __init__(
        self,
        root: str,
        split: str,
        class_set: ClassSet | str,
        *,
        layout: str = "voc",
        mask_dir: str | None = None,
        labels_file: str = "cls_labels.npy",
        skip_bad: bool = False,
        list_dir: str | None = None,
        require_masks: bool = False,
        image_ext: str = ".jpg",
    ):
        if layout not in LAYOUTS:
            raise DataError(f"unknown dataset layout {layout!r}: use one of {', '.join(LAYOUTS)}")
        self.root = root.rstrip("/") or root
        self.split = split
        self.class_set = get_class_set(class_set)
        self.layout = layout
        self.skip_bad = skip_bad
        self.require_masks = require_masks
        self.image_ext = image_ext
        self.list_dir = list_dir or storage.join(self.root, "ImageSets", "Segmentation")
        self.list_uri = storage.join(self.list_dir, f"{split}.txt")

        self.ids: list[str] = self._read_ids()

        self._split_folder: str | None = None
        if layout == "coco":
            if split.startswith("train"):
                self._split_folder = "train"
            elif split.startswith("val"):
                self._split_folder = "val"
            else:
                raise DataError(
                    f"cannot tell the COCO image folder for split {split!r}: name the split "
                    "train* or val* (images live in JPEGImages/train and JPEGImages/val)"
                )
            self.image_dir = storage.join(self.root, "JPEGImages", self._split_folder)
        else:
            self.image_dir = storage.join(self.root, "JPEGImages")

        self.mask_dir: str | None = self._find_mask_dir(mask_dir)
        if self.require_masks and self.mask_dir is None:
            raise DataError(
                f"split {split!r} of {self.root} needs masks but no mask folder was found "
                f"(looked for {self._mask_dir_candidates(mask_dir)}); pass mask_dir="
            )

        self.labels_uri: str | None = None
        self.labels_derived = False
        self._labels: dict[str, np.ndarray] = {}
        self._load_labels(labels_file)

    # -- construction helpers -------------------------------------------------------------

    def _read_ids(self) -> list[str]:
        try:
            text = storage.read_text(self.list_uri)
        except (StorageError, FileNotFoundError):
            if storage.exists(self.list_uri):
                raise
            raise DataError(
                f"split list not found: expected {self.list_uri} (one image id per line); check "
                "the dataset root and split name, or pass list_dir="
            ) from None
        ids = _parse_split_list(text)
        if not ids:
            raise DataError(f"split list {self.list_uri} is empty: add one image id per line")
        return ids

    def _mask_dir_candidates(self, mask_dir: str | None) -> list[str]:
        if self.layout == "coco":
            base = mask_dir or storage.join(self.root, "SegmentationClass")
            return [storage.join(base, self._split_folder or "")]
        if mask_dir:
            return [mask_dir]
        return [
            storage.join(self.root, "SegmentationClassAug"),
            storage.join(self.root, "SegmentationClass"),
        ]

    def _find_mask_dir(self, mask_dir: str | None) -> str | None:
        """First candidate folder that exists (a folder, or holds the first id's mask: S3 has no
        folders)."""
        candidates = self._mask_dir_candidates(mask_dir)
        for cand in candidates:
            if _safe_exists(cand) or _safe_exists(self._mask_uri_in(cand, self.ids[0])):
                return cand
        if mask_dir:
            raise DataError(f"mask_dir {candidates[0]} does not exist: fix the path or leave mask_dir unset")
        return None

    def _mask_uri_in(self, folder: str, image_id: str) -> str:
        name = _COCO_PREFIX.sub("", image_id) if self.layout == "coco" else image_id
        return storage.join(folder, f"{name}.png")

    def _load_labels(self, labels_file: str) -> None:
        if _is_absolute(labels_file):
            candidates = [labels_file]
        else:
            candidates = [storage.join(self.root, labels_file), storage.join(self.list_dir, labels_file)]
        for cand in dict.fromkeys(candidates):
            if _safe_exists(cand):
                self.labels_uri = cand
                break
        if self.labels_uri is None:
            if self.mask_dir is None:
                raise DataError(
                    f"no image-level labels for {self.root}: expected {candidates[0]} (or masks "
                    "to derive labels from); pass labels_file= pointing at cls_labels.npy/.json"
                )
            self.labels_derived = True
            msg = f"{candidates[0]} not found: deriving image-level labels from masks in {self.mask_dir}"
            if msg not in _logged_once:
                _logged_once.add(msg)
                log.info(msg)
            return
        self._labels = load_cls_labels(self.labels_uri)
        first = self._labels.get(self.ids[0])
        if first is None:
            first = self._lookup_label(self.ids[0])
        if first is None and self._labels:
            first = next(iter(self._labels.values()))
        if first is None:
            raise DataError(f"labels file {self.labels_uri} is empty: regenerate it")
        self._check_label_width(first)

    def _check_label_width(self, vec: np.ndarray) -> None:
        want = self.class_set.num_classes - 1
        if vec.shape != (want,):
            raise ClassListMismatch(
                f"class list {self.class_set.name!r} has {want} foreground classes but "
                f"{self.labels_uri} has {vec.size}-dim labels: wrong class list? pass the class "
                "set that matches this dataset"
            )

    def _lookup_label(self, image_id: str) -> np.ndarray | None:
        vec = self._labels.get(image_id)
        if vec is None and self.layout == "coco":
            vec = self._labels.get(_COCO_PREFIX.sub("", image_id))
        return vec

    # -- public API -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"SegDataset(root={self.root!r}, split={self.split!r}, class_set={self.class_set.name!r}, "
            f"layout={self.layout!r}, n={len(self.ids)})"
        )

    def image_uri(self, image_id: str) -> str:
        """Where the image of ``image_id`` lives."""
        return storage.join(self.image_dir, f"{image_id}{self.image_ext}")

    def mask_uri(self, image_id: str) -> str | None:
        """Where the mask of ``image_id`` would live; None when the dataset has no masks."""
        if self.mask_dir is None:
            return None
        return self._mask_uri_in(self.mask_dir, image_id)

    def read_image_bytes(self, image_id: str) -> bytes:
        """Raw encoded image bytes (pipeline stages ship bytes, not decoded arrays)."""
        uri = self.image_uri(image_id)
        data = _read_or_none(uri)
        if data is None:
            raise DataError(
                f"image missing: {uri} (listed in {self.list_uri}); restore it, remove the id from "
                "the list, or pass skip_bad=True"
            )
        return data

    def read_mask(self, image_id: str) -> np.ndarray | None:
        """Decoded, validated mask of ``image_id``; None when it has none (and none is needed)."""
        uri = self.mask_uri(image_id)
        data = _read_or_none(uri) if uri is not None else None
        if data is None:
            if uri is not None and (self.require_masks or self.labels_derived):
                why = "labels are derived from masks" if self.labels_derived else "require_masks=True"
                raise DataError(f"mask missing: {uri} ({why}); restore it or pass skip_bad=True")
            return None
        mask = decode_mask(data, uri)
        k = self.class_set.num_classes
        if mask.size and int(mask.max()) >= k:
            values = np.unique(mask)
            bad = values[(values >= k) & (values != IGNORE_INDEX)]
            if bad.size:
                raise ClassListMismatch(
                    f"mask {uri} has class id {int(bad[0])} but class list "
                    f"{self.class_set.name!r} has {k} classes (ids 0..{k - 1}, 255 = ignore): "
                    "wrong class list?"
                )
        return mask

    def label_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Multi-hot of the foreground classes present in ``mask`` (ignoring 0 and 255)."""
        k = self.class_set.num_classes
        present = np.unique(mask)
        present = present[(present > 0) & (present < k)].astype(np.int64)
        label = np.zeros(k - 1, dtype=np.float32)
        label[present - 1] = 1.0
        return label

    def read_label(self, image_id: str, mask: np.ndarray | None = None) -> np.ndarray:
        """Image-level multi-hot of ``image_id`` (from the labels file, or from ``mask``)."""
        if self.labels_derived:
            if mask is None:
                mask = self.read_mask(image_id)
            if mask is None:
                raise DataError(f"no mask for {image_id} to derive its label from; restore {self.mask_uri(image_id)}")
            return self.label_from_mask(mask)
        vec = self._lookup_label(image_id)
        if vec is None:
            raise DataError(
                f"no image-level label for {image_id!r} in {self.labels_uri}: add it, remove the "
                f"id from {self.list_uri}, or pass skip_bad=True"
            )
        if vec.shape != (self.class_set.num_classes - 1,):
            raise DataError(
                f"label of {image_id!r} in {self.labels_uri} has {vec.size} entries, expected "
                f"{self.class_set.num_classes - 1}: the labels file is inconsistent; regenerate it"
            )
        return vec.astype(np.float32, copy=True)

    def load(self, image_id: str) -> Sample:
        """Read and check one item; raises DataError naming the offending file.

        The image comes in its displayed orientation (EXIF applied, as every stage reads it). A mask
        drawn on the stored pixels instead (same size as the un-rotated image) is rotated with it."""
        image_uri = self.image_uri(image_id)
        raw, orientation = decode_image_oriented(self.read_image_bytes(image_id), image_uri)
        image = orient(raw, orientation)
        mask = self.read_mask(image_id)
        if mask is not None and mask.shape != image.shape[:2] and mask.shape == raw.shape[:2]:
            mask = orient(mask, orientation)
        if mask is not None and mask.shape != image.shape[:2]:
            raise DataError(
                f"image {image_uri} is {image.shape[1]}x{image.shape[0]} but mask "
                f"{self.mask_uri(image_id)} is {mask.shape[1]}x{mask.shape[0]}: replace one of them"
            )
        label = self.read_label(image_id, mask)
        return Sample(id=image_id, image=image, label=label, mask=mask)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.ids[index])

    def __iter__(self) -> Iterator[Sample]:
        """Yield samples in list order; with ``skip_bad`` per-item problems are logged and skipped
        (class-list mismatches never are)."""
        for image_id in self.ids:
            try:
                sample = self.load(image_id)
            except ClassListMismatch:
                raise
            except DataError as e:
                if not self.skip_bad:
                    raise
                log.warning("skipping %s: %s", image_id, e)
                continue
            yield sample


def open_dataset(root: str, split: str, class_set: ClassSet | str, **kw) -> SegDataset:
    """Open ``root`` with the layout its class set implies (COCO -> coco layout, else voc);
    keyword arguments override (see ``SegDataset``)."""
    cs = get_class_set(class_set)
    kw.setdefault("layout", "coco" if cs.name == "coco" else "voc")
    return SegDataset(root, split, cs, **kw)


def open_split(data_cfg, split: str) -> SegDataset:
    """The split of the dataset a job spec's ``data`` section (``DataConfig``) describes."""
    return open_dataset(data_cfg.root, split, class_set_for(data_cfg), layout=data_cfg.layout,
                        labels_file=data_cfg.labels_file, list_dir=data_cfg.list_dir, mask_dir=data_cfg.mask_dir,
                        skip_bad=data_cfg.skip_bad)


_SPLITS: dict[tuple[str, str], SegDataset] = {}
_SPLITS_SCOPE: list[str] = [""]


def cached_split(data_cfg, split: str, scope: str) -> SegDataset:
    """:func:`open_split`, once per (data config, split) within ``scope`` (a run's id): Ray Data task
    processes run many batches, and a COCO split list and labels file are too big to read again for each.
    Task processes outlive a run, so a new scope drops what an earlier run read (its data may have changed)."""
    if scope != _SPLITS_SCOPE[0]:
        _SPLITS.clear()
        _SPLITS_SCOPE[0] = scope
    key = (repr(data_cfg), split)
    if key not in _SPLITS:
        _SPLITS[key] = open_split(data_cfg, split)
    return _SPLITS[key]
