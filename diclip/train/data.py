"""Training data: a deterministic sample order and per-sample augmentation, streamed by Ray Data.

Sample order is a pure function of (seed, position): position ``p`` belongs to epoch ``p // n`` and
picks item ``perm_epoch[p % n]`` of a seeded permutation; its crop geometry comes from an RNG seeded
with (seed, p). Worker ``r`` at micro-step ``t`` consumes positions ``t * G + r * b ... + b - 1``
(G = b * world). So a run resumed at step ``s`` sees exactly the samples the uninterrupted run would
have seen, whatever Ray Data's scheduling did.

The driver builds one small index table per rank (positions, ids, labels, where each image's maps
live); Ray Data tasks load and augment the rows (:func:`load_rows`); workers only resample the maps.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from diclip.config import JobSpec
from diclip.data import open_split
from diclip.data.correlation import CorrelationStore
from diclip.data.datasets import decode_image
from diclip.data.transforms import apply_geometry, sample_geometry
from diclip.errors import DataError

if TYPE_CHECKING:
    from diclip.method.resample import Geometry




def build_items(spec: JobSpec, split: str, correlation_uri: str | None) -> pa.Table:
    """item_id, label, image_uri (+ corr_shard, corr_row when stored maps are used) for a split."""
    ds = open_split(spec.data, split)
    store = CorrelationStore(correlation_uri) if correlation_uri else None
    ids, labels, uris, shards, rows = [], [], [], [], []
    missing = []
    for item in ds.ids:
        if store is not None and item not in store:
            missing.append(item)
            continue
        ids.append(item)
        labels.append(ds.read_label(item).astype(np.float32).tolist())
        uris.append(ds.image_uri(item))
        if store is not None:
            s, r = store.locate(item)
            shards.append(s)
            rows.append(r)
    if store is not None and missing:
        failed = {i for i, _ in __import__("diclip").storage.read_failures(correlation_uri)}
        unexplained = [m for m in missing if m not in failed]
        if unexplained:
            raise DataError(f"{len(unexplained)} {split} images have no correlation map (e.g. {unexplained[0]!r}); "
                            f"run correlate with data.{split} in correlate.splits")
    if not ids:
        raise DataError(f"split {split!r} has no usable images")
    cols = {"item_id": ids, "label": labels, "image_uri": uris}
    if store is not None:
        cols.update(corr_shard=shards, corr_row=rows)
    return pa.table(cols)


def item_index(positions: np.ndarray, num_items: int, seed: int) -> np.ndarray:
    """Item index of each global position (seeded permutation per epoch)."""
    epochs = positions // num_items
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(num_items)
        sel = epochs == e
        out[sel] = perm[positions[sel] % num_items]
    return out


def rank_positions(rank: int, world: int, per_worker: int, start_micro: int, end_micro: int) -> np.ndarray:
    """Global positions consumed by ``rank`` over micro-steps [start_micro, end_micro)."""
    t = np.arange(start_micro, end_micro, dtype=np.int64)[:, None]
    j = np.arange(per_worker, dtype=np.int64)[None]
    return (t * (per_worker * world) + rank * per_worker + j).reshape(-1)


def rank_table(items: pa.Table, rank: int, world: int, per_worker: int, start_micro: int, end_micro: int,
               seed: int) -> pa.Table:
    pos = rank_positions(rank, world, per_worker, start_micro, end_micro)
    idx = item_index(pos, items.num_rows, seed)
    return items.take(pa.array(idx)).append_column("pos", pa.array(pos, pa.int64()))


def load_rows(batch: dict, crop: int, scale_range: tuple[float, float], flip: bool, seed: int,
              with_maps: bool, storage_options: dict | None = None) -> dict:
    """Ray Data batch function: read + decode + augment images, fetch map rows. Pure per position.

    Runs in Ray Data task processes, which know nothing of the job: ``storage_options`` points
    them at the job's object store.
    """
    from diclip import storage

    if storage_options is not None:
        opts = storage.StorageOptions(**storage_options)
        if storage.get_options() != opts:
            storage.configure(opts)

    out: dict[str, list] = {k: [] for k in ("pos", "item_id", "image", "label", "geom")}
    corr_cols: dict[str, list] = {}
    for i in range(len(batch["pos"])):
        pos = int(batch["pos"][i])
        uri = str(batch["image_uri"][i])
        image = decode_image(storage.read_bytes(uri), uri)
        rng = np.random.default_rng([seed, 7919, pos])
        geom = sample_geometry(rng, image.shape[:2], crop, scale_range, flip)
        out["pos"].append(pos)
        out["item_id"].append(str(batch["item_id"][i]))
        out["image"].append(apply_geometry(image, geom))
        out["label"].append(np.asarray(batch["label"][i], dtype=np.float32))
        out["geom"].append(np.asarray([*geom.src_size, *geom.scaled_size, int(geom.flip), *geom.offset,
                                       *geom.out_size], dtype=np.int64))
        if with_maps:
            row = storage.read_parquet_rows(str(batch["corr_shard"][i]), [int(batch["corr_row"][i])]).to_pylist()[0]
            for k, v in row.items():
                corr_cols.setdefault(f"corr_{k}", []).append(v)
    result = {k: np.stack(v) if k in ("image", "label", "geom") else np.asarray(v) for k, v in out.items()}
    for k, v in corr_cols.items():
        arr = np.empty(len(v), dtype=object)
        arr[:] = v
        result[k] = arr
    return result


def geometry_from_array(a) -> "Geometry":
    from diclip.method.resample import Geometry

    a = [int(x) for x in a]
    return Geometry((a[0], a[1]), (a[2], a[3]), bool(a[4]), (a[5], a[6]), (a[7], a[8]))


def records_from_batch(batch: dict) -> list:
    """CorrelationRecords from the ``corr_*`` columns of a loaded batch."""
    from diclip.data.correlation import MAP_COLUMNS, CorrelationRecord

    n = len(batch["pos"])
    return [CorrelationRecord.from_row({c: batch[f"corr_{c}"][i] for c in MAP_COLUMNS}) for i in range(n)]
