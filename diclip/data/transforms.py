"""Training augmentation with an explicit geometry record.

Reference recipe: random rescale (ratio U(0.5, 2.0), ``int(size * ratio)``, bilinear), horizontal flip
(p = 0.5), pad with 0 to at least the crop size at a random offset, random crop. The reference also
retries crops until no GT class covers more than 75% of the crop, which reads the ground-truth mask;
we drop that so training stays weakly supervised. The :class:`~diclip.method.resample.Geometry` of
every sample is returned so correlation maps stored for the whole image can be resampled the same way.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from diclip.method.resample import Geometry


def sample_geometry(rng: np.random.Generator, src_size: tuple[int, int], crop: int,
                    scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True) -> Geometry:
    h, w = src_size
    ratio = float(rng.uniform(scale_range[0], scale_range[1]))
    hs, ws = max(1, int(h * ratio)), max(1, int(w * ratio))
    do_flip = bool(flip and rng.random() < 0.5)
    canvas_h, canvas_w = max(crop, hs), max(crop, ws)
    pad_y = int(rng.integers(canvas_h - hs + 1))
    pad_x = int(rng.integers(canvas_w - ws + 1))
    cy = int(rng.integers(canvas_h - crop + 1))
    cx = int(rng.integers(canvas_w - crop + 1))
    return Geometry((h, w), (hs, ws), do_flip, (cy - pad_y, cx - pad_x), (crop, crop))


def apply_geometry(array: np.ndarray, geom: Geometry, *, is_mask: bool = False, fill: int = 0) -> np.ndarray:
    """Apply ``geom`` to an image (H, W, 3 uint8, bilinear) or a mask (H, W uint8, nearest)."""
    if tuple(array.shape[:2]) != tuple(geom.src_size):
        raise ValueError(f"array of size {array.shape[:2]} does not match geometry {geom.src_size}")
    if geom.is_identity:
        return array.copy()
    img = Image.fromarray(array)
    if tuple(geom.scaled_size) != tuple(geom.src_size):
        img = img.resize((geom.scaled_size[1], geom.scaled_size[0]), Image.NEAREST if is_mask else Image.BILINEAR)
    scaled = np.array(img)
    if geom.flip:
        scaled = scaled[:, ::-1]
    oh, ow = geom.out_size
    out = np.full((oh, ow) + scaled.shape[2:], fill, dtype=scaled.dtype)
    oy, ox = geom.offset
    y0, x0 = max(0, oy), max(0, ox)
    y1, x1 = min(scaled.shape[0], oy + oh), min(scaled.shape[1], ox + ow)
    if y1 > y0 and x1 > x0:
        out[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = scaled[y0:y1, x0:x1]
    return out


def resize_geometry(src_size: tuple[int, int], out_size: tuple[int, int]) -> Geometry:
    """Whole image resized to ``out_size`` (evaluation / extraction)."""
    return Geometry(tuple(src_size), tuple(out_size), False, (0, 0), tuple(out_size))
