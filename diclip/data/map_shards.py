"""Reading correlation shards written by the ``correlate`` stage.

A row per image: ``item_id``, ``split``, the source size, the CLIP token grid the maps live on, the
VCE map in compact form (``vce_ids`` uint8 [N], ``vce_rows`` fp16 [K, N]), and the RAR map through a
codec (``rar``: an ``.npz`` blob, ``allow_pickle=False``; ``rar_codec`` names the codec).

:func:`batch_maps` turns records plus the geometry of each training crop into the maps the
training step consumes: the VCE map ``P R P^T`` on the crop's CLIP grid and the RAR head-mean map on
the crop's attention grid. For un-augmented images both come back exactly as stored.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from diclip import storage
from diclip.errors import DataError, StorageError
from diclip.storage.commit_index import CommitIndex
from diclip.method.codecs import get_codec
from diclip.method.resample import Geometry, batch_taps, resample_compact

SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("split", pa.string()),
    ("src_h", pa.int32()), ("src_w", pa.int32()),
    ("grid_h", pa.int16()), ("grid_w", pa.int16()),
    ("vce_k", pa.int16()),
    ("vce_ids", pa.binary()),
    ("vce_rows", pa.binary()),
    ("rar_grid_h", pa.int16()), ("rar_grid_w", pa.int16()),
    ("rar_codec", pa.string()),
    ("rar", pa.binary()),
    ("crop", pa.int16()),  # -1: whole image; k >= 0: crop k of the per-crop bank (row id "{image}@crop{k}")
    ("geom", pa.list_(pa.int32())),  # the bank crop's geometry (diclip.data.crop_bank); [] for whole images
])
MAP_COLUMNS = [f.name for f in SCHEMA]
BANK_COLUMNS = ("crop", "geom")  # kept in the commit index, so the training index needs no shard reads


def pack_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass
class CorrelationRecord:
    item_id: str
    src_size: tuple[int, int]
    grid: tuple[int, int]
    vce_ids: np.ndarray
    vce_rows: np.ndarray
    rar_grid: tuple[int, int]
    rar_codec: str
    rar: dict[str, np.ndarray]
    crop: int = -1

    @staticmethod
    def from_row(row: dict) -> "CorrelationRecord":
        grid = (int(row["grid_h"]), int(row["grid_w"]))
        n = grid[0] * grid[1]
        k = int(row["vce_k"])
        return CorrelationRecord(
            item_id=str(row["item_id"]),
            src_size=(int(row["src_h"]), int(row["src_w"])),
            grid=grid,
            vce_ids=np.frombuffer(row["vce_ids"], dtype=np.uint8).reshape(n),
            vce_rows=np.frombuffer(row["vce_rows"], dtype=np.float16).reshape(k, n),
            rar_grid=(int(row["rar_grid_h"]), int(row["rar_grid_w"])),
            rar_codec=str(row["rar_codec"]),
            rar=unpack_npz(row["rar"]),
            crop=int(row.get("crop", -1) if row.get("crop") is not None else -1),
        )

    def nbytes(self) -> int:
        return self.vce_ids.nbytes + self.vce_rows.nbytes + sum(v.nbytes for v in self.rar.values())


def batch_maps(records: list[CorrelationRecord], geoms: list[Geometry] | None, clip_grid: tuple[int, int] | None,
               rar_grid: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """VCE maps [B, N', N'] and RAR head-mean maps [B, M', M'] for the given crops.

    ``geoms=None`` returns the stored maps (all records must share a grid to be stacked).
    """
    codecs = {r.rar_codec for r in records}
    if len(codecs) != 1:
        raise DataError(f"records mix RAR codecs {sorted(codecs)}")
    codec = get_codec(codecs.pop())
    kmax = max(r.vce_rows.shape[0] for r in records)
    ids = torch.stack([torch.from_numpy(r.vce_ids.astype(np.int64)) for r in records])
    rows = torch.stack([torch.nn.functional.pad(torch.from_numpy(r.vce_rows.astype(np.float32)),
                                                (0, 0, 0, kmax - r.vce_rows.shape[0])) for r in records])
    if geoms is None:
        from diclip.method.acr import expand_compact

        return expand_compact(ids, rows), codec.decode([r.rar for r in records])
    vtaps = batch_taps(geoms, [r.grid for r in records], clip_grid)
    rtaps = batch_taps(geoms, [r.rar_grid for r in records], rar_grid)
    # exact on identity geometries: 1.0/0.0 tap weights reproduce the stored rows bit for bit
    vce = resample_compact(ids, rows, *vtaps)
    return vce, codec.decode([r.rar for r in records], rtaps)


class CorrelationStore:
    """Random access to a complete ``correlate`` output by item id."""

    def __init__(self, uri: str):
        self.uri = uri
        manifest = storage.read_manifest(uri)
        if manifest is None:
            raise StorageError(f"no correlation maps at {uri} (manifest.json missing); run the correlate stage first")
        self.manifest = manifest
        self._index: dict[str, tuple[str, int]] | None = None
        self._commit: CommitIndex | None = None

    @property
    def index(self) -> dict[str, tuple[str, int]]:
        """item id -> (shard URI, row), from the stage's commit index (one read for a complete store)."""
        if self._index is None:
            self._index = {i: (storage.join(self.uri, e[0]), e[1]) for i, e in self._commit_index().entries.items()}
        return self._index

    def _commit_index(self) -> CommitIndex:
        """The stage's commit index, with each row's crop and geometry; loaded once."""
        if self._commit is None:
            self._commit = CommitIndex.load(self.uri, BANK_COLUMNS)
        return self._commit

    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s.path) for s in self.manifest.shards]

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.index

    def locate(self, item_id: str) -> tuple[str, int]:
        if item_id not in self.index:
            raise DataError(f"no correlation map for image {item_id!r} in {self.uri}; re-run correlate for its split")
        return self.index[item_id]

    def get(self, item_ids: list[str]) -> list[CorrelationRecord]:
        return [read_record(*self.locate(i)) for i in item_ids]

    def bank_geometries(self) -> dict[str, list[int]]:
        """Row id -> stored crop geometry (9 ints) for every per-crop bank row."""
        return {i: [int(v) for v in e[3]] for i, e in self._commit_index().entries.items()
                if e[2] is not None and e[2] >= 0}


def read_record(shard: str, row: int) -> CorrelationRecord:
    """One image's maps: a single ranged read (shards are written with one row per row group)."""
    return CorrelationRecord.from_row(storage.read_parquet_rows(shard, [row]).to_pylist()[0])
