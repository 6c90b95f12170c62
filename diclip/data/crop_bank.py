"""The per-crop map bank: K seeded training crops per image, each with the maps the reference computes on it.

The reference runs Stable Diffusion on every augmented training crop. Keeping diffusion out of the
training loop, the ``correlate`` stage instead precomputes, for each training image, ``K`` crop
geometries drawn with the training sampler (:func:`~diclip.data.transforms.sample_geometry`: rescale,
flip, pad + crop) and extracts the maps on each crop exactly as online mode would (same capture, same
ACR, same RAR codec). Training then draws its crop *from the bank* instead of sampling a fresh one.

Everything is a pure function of ids and seeds, so the bank can be built on any number of actors,
resumed, and grown (K=2 -> K=3 adds only crop 2: crop k's geometry and noise do not depend on K):

* crop ``k`` of image ``i``: geometry from ``rng(seed, salt, crc32(i), k)`` and the image's source size;
* its row id is ``"{i}@crop{k}"`` (the noise seed derives from it, like a whole image's from its id);
* the crop a training position uses: epoch ``e = pos // n`` and a per-image shift ``s_i``
  (:func:`bank_crop`): ``(e + s_i) mod K`` - each crop once per K epochs, resume-exact because it only
  depends on (seed, position).
"""
from __future__ import annotations

import zlib

import numpy as np

from diclip.data.transforms import sample_geometry
from diclip.method.resample import Geometry

SALT = 104729
SEP = "@crop"


def crop_item_id(item_id: str, k: int) -> str:
    return f"{item_id}{SEP}{int(k)}"


def split_crop_id(row_id: str) -> tuple[str, int | None]:
    """(image id, crop index) of a bank row id; crop None for a whole-image row."""
    base, sep, k = row_id.rpartition(SEP)
    if sep and k.isdigit():
        return base, int(k)
    return row_id, None


def _crc(item_id: str) -> int:
    return zlib.crc32(item_id.encode("utf-8"))


def bank_geometry(item_id: str, k: int, src_size: tuple[int, int], crop: int, scale_range: tuple[float, float],
                  flip: bool, seed: int) -> Geometry:
    """Crop ``k`` of image ``item_id``: the training sampler with an RNG seeded by (seed, image, k)."""
    rng = np.random.default_rng([int(seed), SALT, _crc(item_id), int(k)])
    return sample_geometry(rng, tuple(src_size), crop, scale_range, flip)


def bank_crop(positions: np.ndarray, num_items: int, item_ids: list[str] | np.ndarray, crops: int,
              seed: int) -> np.ndarray:
    """Crop index for training positions whose images are ``item_ids`` (same length as ``positions``)."""
    epochs = np.asarray(positions, dtype=np.int64) // int(num_items)
    shift = np.asarray([(_crc(f"{seed}:{i}")) % crops for i in item_ids], dtype=np.int64)
    return (epochs + shift) % int(crops)


def geometry_to_array(geom: Geometry) -> list[int]:
    return [*geom.src_size, *geom.scaled_size, int(geom.flip), *geom.offset, *geom.out_size]


def geometry_from_array(a) -> Geometry:
    a = [int(x) for x in a]
    return Geometry((a[0], a[1]), (a[2], a[3]), bool(a[4]), (a[5], a[6]), (a[7], a[8]))
