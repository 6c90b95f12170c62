"""A tiny synthetic WSSS dataset in the VOC layout, for tests and smoke runs without downloads.

Two worlds: ``synthetic`` (below) and ``toy`` (:mod:`diclip.data.toy_world`, textures, the world the
shipped toy models were trained on), chosen by the class set.

Each foreground class has its own shape and colour family (a red ball, a blue box, a green kite,
a yellow star) on a dull textured background, so even a weak model separates them and CLIP can
name them. Masks are exactly the drawn pixels: both the image and the mask are painted from the
same rasterised (non anti-aliased) shape, so pixel-level metrics have a true ground truth.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from diclip import storage
from diclip.data.classes import ClassSet, get_class_set
from diclip.data.labels import save_cls_labels
from diclip.errors import ConfigError, DataError, StorageError
from diclip.logging import get_logger

log = get_logger("diclip.data.synthetic")

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Class id -> (shape, base RGB). Base colours are saturated and far apart; backgrounds are dull,
# so every object pixel is closest to its own class colour.
STYLES: dict[int, tuple[str, tuple[int, int, int]]] = {
    1: ("circle", (205, 45, 40)),  # ball: reds
    2: ("square", (40, 75, 205)),  # box: blues
    3: ("kite", (45, 165, 65)),  # kite: greens
    4: ("star", (235, 200, 35)),  # star: yellows
}
COLOUR_JITTER = 18  # per-channel +- jitter of an object's colour around its class base colour
MIN_SIDE = 16


def voc_palette() -> list[int]:
    """The standard 256-entry PASCAL VOC colour map, flattened for ``Image.putpalette``."""
    palette: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


_PALETTE = voc_palette()


def _size_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        h = w = image_size
    else:
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ConfigError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ConfigError(f"image_size {image_size!r} is too small: use at least {MIN_SIDE} pixels per side")
    return h, w


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth noise + stripes + gradient in a random dull (low-saturation) colour, float HxWx3."""
    grey = rng.uniform(70, 170)
    base = grey + rng.uniform(-18, 18, size=3)
    cells = int(rng.integers(3, 8))
    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(6, 24)
    stripes = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(phi) / w + yy * math.sin(phi) / h)
    lum = 14 * noise + rng.uniform(4, 12) * stripes + rng.uniform(-25, 25) * ramp
    fine = rng.normal(0, 3, size=(h, w, 3))
    return base[None, None, :] + lum[:, :, None] + fine


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _shape_mask(shape: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Rasterise one randomly placed shape as a bool HxW mask (PIL draws without anti-aliasing).

    The centre always lies inside the image and inside the shape, so it has visible pixels.
    """
    r = max(4.0, rng.uniform(0.12, 0.28) * min(h, w))
    cx = rng.uniform(0.6 * r, w - 0.6 * r) if w > 1.2 * r else w / 2
    cy = rng.uniform(0.6 * r, h - 0.6 * r) if h > 1.2 * r else h / 2
    angle = rng.uniform(-0.35, 0.35)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        a = 0.85 * r
        pts = [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=255)
    elif shape == "kite":
        pts = [(cx, cy - 1.2 * r), (cx + 0.75 * r, cy - 0.3 * r), (cx, cy + 1.3 * r), (cx - 0.75 * r, cy - 0.3 * r)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=255)
    elif shape == "star":
        outer, inner = 1.15 * r, 0.5 * r
        start = -math.pi / 2 + angle
        pts = [
            (cx + (outer if k % 2 == 0 else inner) * math.cos(start + k * math.pi / 5),
             cy + (outer if k % 2 == 0 else inner) * math.sin(start + k * math.pi / 5))
            for k in range(10)
        ]
        draw.polygon(pts, fill=255)
    else:  # pragma: no cover - STYLES and this function are edited together
        raise ValueError(shape)
    m = np.asarray(canvas) > 0
    m[min(int(cy), h - 1), min(int(cx), w - 1)] = True  # guarantee a visible pixel
    return m


def render_sample(rng: np.random.Generator, h: int, w: int, num_fg: int, max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 HxWx3 image, uint8 HxW class-id mask) pair; later objects occlude earlier ones."""
    img = _background(rng, h, w)
    mask = np.zeros((h, w), dtype=np.uint8)
    n = int(rng.integers(1, max_objects + 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for _ in range(n):
        cls = int(rng.integers(1, num_fg + 1))
        shape, base = STYLES[cls]
        m = _shape_mask(shape, rng, h, w)
        colour = np.asarray(base, dtype=np.float64) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
        phi = rng.uniform(0, 2 * math.pi)
        shade = 1.0 + 0.06 * ((xx * math.cos(phi) / w + yy * math.sin(phi) / h) - 0.5)  # gentle lighting
        obj = colour[None, None, :] * shade[:, :, None] + rng.normal(0, 2.5, size=(h, w, 3))
        img[m] = obj[m]
        mask[m] = cls
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def _render_toy(seed: int, split: str, i: int, size: int, max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``i`` of a split of the toy world (indices the shipped toy models never saw)."""
    from diclip.data import toy_world

    offset = toy_world.TRAIN_OFFSET if split == "train" else toy_world.VAL_OFFSET
    sample = toy_world.render(seed, offset + i, toy_world.WorldConfig(size=size, max_objects=max(1, max_objects)))
    return sample.image, sample.mask


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG at quality 95 without chroma subsampling, so object colours stay sharp at edges."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Palette PNG whose pixel values are class ids, with VOC colours for viewers."""
    img = Image.fromarray(mask)
    img.putpalette(_PALETTE)  # turns the L image into P without touching the indices
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_params(num_train: int, num_val: int, image_size: int | tuple[int, int], seed: int, max_objects: int,
                     class_set: str | ClassSet) -> dict[str, Any]:
    """What a synthetic dataset is drawn from (recorded in ``synthetic.json``; another value, other images)."""
    h, w = _size_hw(image_size)
    return {"version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val), "image_size": [h, w],
            "seed": int(seed), "max_objects": int(max_objects), "class_set": get_class_set(class_set).name}


def recorded_params(root: str) -> dict[str, Any] | None:
    """The params of the finished synthetic dataset at ``root`` (None when there is none)."""
    uri = storage.join(root.rstrip("/") or root, "synthetic.json")
    try:
        meta = storage.read_json(uri) if storage.exists(uri) else None
    except (StorageError, ValueError):
        return None
    return meta.get("params") if isinstance(meta, dict) else None


def existing_summary(root: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded summary if ``root`` already holds a finished dataset with these params."""
    seg = storage.join(root, "ImageSets", "Segmentation")
    meta_uri = storage.join(root, "synthetic.json")
    try:
        if not all(storage.exists(u) for u in (storage.join(seg, "train.txt"), storage.join(seg, "val.txt"), meta_uri)):
            return None
        meta = storage.read_json(meta_uri)
    except (StorageError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("params") != params:
        return None
    return meta


def _check_request(cs, h: int, w: int, num_train: int, num_val: int, max_objects: int, seed: int) -> None:
    """One-line errors for a request the generator cannot draw."""
    num_fg = cs.num_classes - 1
    if cs.name == "toy" and h != w:
        raise ConfigError(f"the toy world is square: synthesize.image_size must be [s, s], got [{h}, {w}]")
    if cs.name != "toy" and num_fg > len(STYLES):
        raise DataError(
            f"class set {cs.name!r} has {num_fg} foreground classes but the synthetic generator "
            f"draws at most {len(STYLES)}: use class_set='synthetic'"
        )
    if num_train < 1 or num_val < 1:
        raise ConfigError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if max_objects < 1:
        raise ConfigError(f"max_objects must be >= 1, got {max_objects}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")


def _write_sample(root: str, image_id: str, image: np.ndarray, mask: np.ndarray) -> list[int]:
    """The image (JPEG) and its mask (palette PNG) in VOC's folders; returns the classes present."""
    storage.write_bytes(storage.join(root, "JPEGImages", f"{image_id}.jpg"), encode_jpeg(image))
    storage.write_bytes(storage.join(root, "SegmentationClass", f"{image_id}.png"), encode_mask_png(mask))
    return [int(c) for c in np.unique(mask) if c > 0]


def generate_synthetic(
    root: str,
    *,
    num_train: int = 32,
    num_val: int = 16,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    max_objects: int = 2,
    class_set: str = "synthetic",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write a VOC-layout synthetic dataset under ``root`` (local path or s3:// URI).

    ``image_size`` is an int or ``(height, width)``. Deterministic per ``seed``; a re-run with the
    same parameters finds ``synthetic.json`` (written last, so only a finished run counts) and
    returns without writing anything.
    """
    cs = get_class_set(class_set)
    num_fg = cs.num_classes - 1
    h, w = _size_hw(image_size)
    toy = cs.name == "toy"
    _check_request(cs, h, w, num_train, num_val, max_objects, seed)
    params = synthetic_params(num_train, num_val, (h, w), seed, max_objects, cs)
    root = root.rstrip("/") or root

    meta = existing_summary(root, params)
    if meta is not None:
        log.info("synthetic dataset at %s is up to date; nothing to do", root)
        return {"root": root, **{k: meta[k] for k in ("num_train", "num_val", "class_counts")}, "skipped": True}

    labels: dict[str, np.ndarray] = {}
    counts = {split: {name: 0 for name in cs.foreground} for split in SPLITS}
    split_sizes = {"train": int(num_train), "val": int(num_val)}

    def draw(split_code: int, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        if toy:
            return _render_toy(int(seed), split, i, h, int(max_objects))
        return render_sample(np.random.default_rng([int(seed), split_code, i]), h, w, num_fg, int(max_objects))

    with tqdm(total=num_train + num_val, desc="synthetic", disable=not show_progress) as bar:
        for split_code, split in enumerate(SPLITS):
            ids = [f"synth_{split}_{i:05d}" for i in range(split_sizes[split])]
            for i, image_id in enumerate(ids):
                image, mask = draw(split_code, split, i)
                present = _write_sample(root, image_id, image, mask)
                labels[image_id] = np.zeros(num_fg, dtype=np.float32)
                labels[image_id][[c - 1 for c in present]] = 1.0
                for c in present:
                    counts[split][cs.classes[c]] += 1
                bar.update(1)
            storage.write_text(storage.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "\n".join(ids) + "\n")

    save_cls_labels(storage.join(root, "cls_labels.npy"), labels)
    class_counts = {name: counts["train"][name] + counts["val"][name] for name in cs.foreground}
    meta = {
        "params": params, "num_train": int(num_train), "num_val": int(num_val),
        "class_counts": class_counts, "class_counts_by_split": counts,
    }
    storage.write_json(storage.join(root, "synthetic.json"), meta)  # last: marks the set complete
    log.info("wrote synthetic dataset to %s (%d train, %d val)", root, num_train, num_val)
    return {"root": root, "num_train": int(num_train), "num_val": int(num_val), "class_counts": class_counts, "skipped": False}
