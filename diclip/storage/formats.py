"""Parquet tables and safetensors files at a URI, through :mod:`diclip.storage.fs`'s atomic writes and
store-outage retries. Never pickles: a tensor file from a shared bucket is data, not code."""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from diclip.errors import StorageError
from diclip.storage.fs import atomic_write, store_call, storage_error, read_bytes, resolve, write_bytes
from diclip.storage.outages import is_transient, short_reason
from diclip.storage.uris import split_uri

if TYPE_CHECKING:  # torch is only needed by the tensor helpers; keep plain storage use torch-free.
    import torch


# --------------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------------


def write_parquet(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """Atomic zstd-compressed Parquet (good ratio, fast decode for embeddings and ids).

    ``row_group_size`` small (e.g. 1) makes single rows cheap to fetch with :func:`read_parquet_rows`
    (one ranged read on S3 instead of the whole file).
    """
    atomic_write(uri, lambda f: pq.write_table(table, f, compression="zstd", row_group_size=row_group_size))


def _invalid_parquet(uri: str, e: BaseException) -> StorageError:
    """A Parquet read that failed: an outage (retried by :func:`store_call`) or a corrupt file (not)."""
    if split_uri(uri)[0] == "s3" and is_transient(e):
        return storage_error(uri, "read", e)
    return StorageError(f"not a valid Parquet file: {uri}: {short_reason(e)}")


def _with_parquet(uri: str, fn: Callable[[pq.ParquetFile], Any]) -> Any:
    """``fn(ParquetFile)`` on an open file; the whole read is one retried operation (ranged reads on S3
    happen inside ``fn``, so an outage in the middle of them is waited out as well)."""
    fs, path = resolve(uri)

    def once() -> Any:
        f = fs.open_input_file(path)
        try:
            try:
                pf = pq.ParquetFile(f)
            except (OSError, pa.ArrowException) as e:
                raise _invalid_parquet(uri, e) from e
            try:
                return fn(pf)
            except (OSError, pa.ArrowException) as e:
                raise _invalid_parquet(uri, e) from e
        finally:
            f.close()

    return store_call(uri, "read", once)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, optionally only ``columns`` (unknown names are an error, not empty)."""

    def read(pf: pq.ParquetFile) -> pa.Table:
        if columns is not None:
            names = pf.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise StorageError(f"columns {missing} not in Parquet file {uri} (has {names})")
        return pf.read(columns=columns)

    return _with_parquet(uri, read)


def read_parquet_rows(uri: str, rows: list[int], columns: list[str] | None = None) -> pa.Table:
    """Only the given rows (in the given order), reading just the row groups that hold them."""

    def read(pf: pq.ParquetFile) -> pa.Table:
        md = pf.metadata
        starts, acc = [], 0
        for g in range(md.num_row_groups):
            starts.append(acc)
            acc += md.row_group(g).num_rows
        if any(r < 0 or r >= acc for r in rows):
            raise StorageError(f"row index out of range for {uri} ({acc} rows)")
        groups = sorted({max(g for g in range(len(starts)) if starts[g] <= r) for r in rows})
        table = pf.read_row_groups(groups, columns=columns)
        offset = {g: sum(md.row_group(x).num_rows for x in groups[:i]) for i, g in enumerate(groups)}
        take = []
        for r in rows:
            g = max(x for x in groups if starts[x] <= r)
            take.append(offset[g] + r - starts[g])
        return table.take(pa.array(take, pa.int64()))

    return _with_parquet(uri, read)


def parquet_num_rows(uri: str) -> int:
    """Row count from the footer, without reading any column data."""
    return _with_parquet(uri, lambda pf: int(pf.metadata.num_rows))


# --------------------------------------------------------------------------------------------------
# Tensors (safetensors only: loading pickles from a shared bucket would execute arbitrary code)
# --------------------------------------------------------------------------------------------------


def save_tensors(
    uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) as a safetensors file."""
    from safetensors.torch import save

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise StorageError(
                f"safetensors metadata must map str to str; bad keys {bad} for {uri}"
            )
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    data = save(cpu, metadata=metadata)
    write_bytes(uri, data)


def _safetensors_metadata(uri: str, data: bytes) -> dict[str, str]:
    """Validate the safetensors header and return its ``__metadata__`` (the format is
    8-byte little-endian header length, then a JSON header)."""
    if len(data) < 8:
        raise StorageError(f"not a valid safetensors file: {uri}: only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > len(data) - 8:
        raise StorageError(f"not a valid safetensors file: {uri}: bad header length {n}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"not a valid safetensors file: {uri}: header is not JSON") from e
    if not isinstance(header, dict):
        raise StorageError(f"not a valid safetensors file: {uri}: header is not an object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise StorageError(f"not a valid safetensors file: {uri}: __metadata__ is not an object")
    return {str(k): str(v) for k, v in meta.items()}


def load_tensors(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file: ``(tensors on CPU, metadata)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_bytes(uri)
    metadata = _safetensors_metadata(uri, data)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise StorageError(f"not a valid safetensors file: {uri}: {short_reason(e)}") from e
    return tensors, metadata
