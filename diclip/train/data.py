"""Training data: a deterministic sample order and per-sample augmentation, streamed by Ray Data.

Sample order is a pure function of (seed, position): position ``p`` belongs to epoch ``p // n`` and
picks item ``perm_epoch[p % n]`` of a seeded permutation; its crop geometry comes from an RNG seeded
with (seed, p). Worker ``r`` at micro-step ``t`` consumes positions ``t * G + r * b ... + b - 1``
(G = b * world). So a run resumed at step ``s`` sees exactly the samples the uninterrupted run would
have seen, whatever Ray Data's scheduling did.

The driver builds one small index table per rank (positions, ids, labels, where each image's maps
live); Ray Data tasks load and augment the rows (:func:`load_rows`); workers only resample the maps.

With a per-crop map bank (``correlate.crops_per_image = K``) the index holds K rows per image (its
bank crops, with their geometry) and position ``p`` takes crop :func:`~diclip.data.crop_bank.bank_crop`
of its image: the crop's pixels are rebuilt from the stored geometry and its maps are used as stored.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from diclip.config import JobSpec
from diclip.data import open_split
from diclip.data.map_shards import CorrelationStore
from diclip.data.crop_bank import bank_crop, crop_item_id
from diclip.data.crop_bank import geometry_from_array as bank_geometry_from_array
from diclip.data.datasets import decode_image
from diclip.data.transforms import apply_geometry, sample_geometry
from diclip.errors import DataError
from diclip.method.resample import Geometry




def build_items(spec: JobSpec, split: str, correlation_uri: str | None) -> pa.Table:
    """item_id, label, image_uri (+ corr_shard, corr_row when stored maps are used) for a split.

    When the correlation store holds a crop bank for ``split``, K rows per image (crop k = row
    ``i * K + k``) with the crop's ``bank_geom``; the table's metadata records K (``crops``)."""
    from diclip import storage

    ds = open_split(spec.data, split)
    store = CorrelationStore(correlation_uri) if correlation_uri else None
    crops = bank_crops(store, split, spec.correlate.crops_per_image) if store is not None else 0
    geoms = store.bank_geometries() if crops else {}
    cols: dict[str, list] = {"item_id": [], "label": [], "image_uri": []}
    if store is not None:
        cols.update(corr_shard=[], corr_row=[])
    if crops:
        cols["bank_geom"] = []
    missing = []
    for item in ds.ids:
        keys = [crop_item_id(item, k) for k in range(crops)] if crops else [item]
        if store is not None and not all(k in store for k in keys):
            missing.append(item)
            continue
        label = ds.read_label(item).astype(np.float32).tolist()
        for key in keys:
            cols["item_id"].append(item)
            cols["label"].append(label)
            cols["image_uri"].append(ds.image_uri(item))
            if store is not None:
                shard, row = store.locate(key)
                cols["corr_shard"].append(shard)
                cols["corr_row"].append(row)
            if crops:
                cols["bank_geom"].append(geoms[key])
    if store is not None and missing:
        failed = {i for i, _ in storage.read_failures(correlation_uri)}
        unexplained = [m for m in missing if m not in failed and not any(crop_item_id(m, k) in failed
                                                                         for k in range(crops))]
        if unexplained:
            raise DataError(f"{len(unexplained)} {split} images have no correlation map (e.g. {unexplained[0]!r}); "
                            f"run correlate with data.{split} in correlate.splits")
    if not cols["item_id"]:
        raise DataError(f"split {split!r} has no usable images")
    table = pa.table(cols)
    import json

    return table.replace_schema_metadata({b"crops": str(crops).encode(), b"dropped": json.dumps(missing).encode()})


def dropped_items(items: pa.Table) -> list[str]:
    """Images of the split left out of training because their maps failed in ``correlate``."""
    import json

    return json.loads((items.schema.metadata or {}).get(b"dropped", b"[]"))


def bank_crops(store: CorrelationStore, split: str, want: int) -> int:
    """Crops per image training draws from: the spec's K (``want``; 0 = whole-image maps), which the
    store's bank must cover. A store grown to more crops serves a smaller K (crops 0..K-1), so what
    trains depends on the spec, not on the store's history."""
    if not want:
        return 0
    extra = store.manifest.extra
    have = int(extra.get("crops_per_image", 0) or 0) if extra.get("crop_split") == split else 0
    if have < want:
        raise DataError(f"correlate.crops_per_image={want} but the maps at {store.uri} hold {have} crops per "
                        f"{split!r} image; run the correlate stage with this spec first")
    return want


def table_crops(items: pa.Table) -> int:
    meta = items.schema.metadata or {}
    return int(meta.get(b"crops", b"0"))


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
    crops = table_crops(items)
    n = items.num_rows // max(1, crops)
    idx = item_index(pos, n, seed)
    if crops:  # K rows per image: take the image's bank crop for this position
        ids = items.column("item_id").to_pylist()
        idx = idx * crops + bank_crop(pos, n, [ids[i * crops] for i in idx], crops, seed)
    return items.take(pa.array(idx)).append_column("pos", pa.array(pos, pa.int64()))


def load_rows(batch: dict, crop: int, scale_range: tuple[float, float], flip: bool, seed: int,
              with_maps: bool, storage_options: dict | None = None) -> dict:
    """Ray Data batch function: read + decode + augment images, fetch map rows. Pure per position.

    The reads of a batch go out together on threads, map rows grouped per shard (one ranged read for all
    of a shard's rows), so a task waits for one round trip per batch, not one per sample.

    Runs in Ray Data task processes, which know nothing of the job: ``storage_options`` points
    them at the job's object store.
    """
    from diclip import storage

    if storage_options is not None:
        storage.configure(storage.StorageOptions(**storage_options))  # a no-op when already so

    n = len(batch["pos"])
    uris = [str(u) for u in batch["image_uri"]]
    # all of the batch's I/O at once on threads (object-store round trips overlap), then CPU work without waits
    pool = io_pool()
    image_bytes = pool.map(storage.read_bytes, uris)
    maps = (fetch_map_rows([str(s) for s in batch["corr_shard"]], [int(r) for r in batch["corr_row"]], pool)
            if with_maps else None)
    image_bytes = list(image_bytes)
    out: dict[str, list] = {k: [] for k in ("pos", "item_id", "image", "label", "geom")}
    corr_cols: dict[str, list] = {}
    for i in range(n):
        pos = int(batch["pos"][i])
        uri = uris[i]
        image = decode_image(image_bytes[i], uri)
        if "bank_geom" in batch:  # the bank's crop: its pixels from the stored geometry, its maps as stored
            bank = bank_geometry_from_array(batch["bank_geom"][i])
            if tuple(bank.src_size) != image.shape[:2]:
                raise DataError(f"{uri}: image is {image.shape[:2]} but its crop bank was built for {bank.src_size}; "
                                "re-run correlate")
            out["image"].append(apply_geometry(image, bank))
            geom = Geometry.identity(bank.out_size)
        else:
            rng = np.random.default_rng([seed, 7919, pos])
            geom = sample_geometry(rng, image.shape[:2], crop, scale_range, flip)
            out["image"].append(apply_geometry(image, geom))
        out["pos"].append(pos)
        out["item_id"].append(str(batch["item_id"][i]))
        out["label"].append(np.asarray(batch["label"][i], dtype=np.float32))
        out["geom"].append(np.asarray([*geom.src_size, *geom.scaled_size, int(geom.flip), *geom.offset,
                                       *geom.out_size], dtype=np.int64))
        if maps is not None:
            for k, v in maps[i].items():
                corr_cols.setdefault(f"corr_{k}", []).append(v)
    result = {k: np.stack(v) if k in ("image", "label", "geom") else np.asarray(v) for k, v in out.items()}
    for k, v in corr_cols.items():
        arr = np.empty(len(v), dtype=object)
        arr[:] = v
        result[k] = arr
    return result


IO_THREADS = 16  # concurrent object-store reads per loader task (latency-bound, not CPU-bound)
_IO_POOL: ThreadPoolExecutor | None = None


def io_pool() -> ThreadPoolExecutor:
    """This process's reader threads (one pool for the task process's life, not one per batch)."""
    global _IO_POOL
    if _IO_POOL is None:
        _IO_POOL = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="diclip-read")
    return _IO_POOL


def fetch_map_rows(shards: list[str], rows: list[int], pool: ThreadPoolExecutor) -> list[dict]:
    """The batch's map rows in batch order: one ranged read per shard (its rows together), shards in parallel."""
    from diclip import storage

    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(shards):
        by_shard.setdefault(shard, []).append(i)
    tables = pool.map(lambda kv: storage.read_parquet_rows(kv[0], [rows[i] for i in kv[1]]).to_pylist(),
                      list(by_shard.items()))
    out: list[dict] = [{}] * len(shards)
    for idx, got in zip(by_shard.values(), tables):
        for i, row in zip(idx, got):
            out[i] = row
    return out


geometry_from_array = bank_geometry_from_array


def records_from_batch(batch: dict) -> list:
    """CorrelationRecords from the ``corr_*`` columns of a loaded batch."""
    from diclip.data.map_shards import MAP_COLUMNS, CorrelationRecord

    n = len(batch["pos"])
    return [CorrelationRecord.from_row({c: batch[f"corr_{c}"][i] for c in MAP_COLUMNS}) for i in range(n)]
