"""The commit index: which shard (and row) holds each committed item of a stage, in one object.

Resume and the training index used to read the id column of every shard: about 10^4 object-store reads,
one after another from the driver, at COCO scale. Now every actor call reports where it wrote each item
(:func:`annotate`), the driver saves those entries as the run goes (``index/run-*.parquet``, one object per
run, rewritten every ``SAVE_EVERY_S``), and ``finalize`` compacts everything into ``index.parquet`` next to
the manifest. Loading a stage reads ``index.parquet``, the run parts, and only the shards no index covers
(written by a run killed before its next save): a complete or resumed stage costs a handful of reads.

Every entry also carries its shard's row count, so a shard the index covers only in part (impossible with one
report per actor call, but cheap to guard) is read in full rather than trusted.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa

from diclip import storage

ID = "item_id"
INDEX_FILE = "index.parquet"
PARTS_DIR = "index"
SHARD_DIR = "shards"
SAVE_EVERY_S = 30.0
BASE_COLUMNS = ("shard", "row", "shard_rows")


def relative(stage_uri: str, uri: str) -> str:
    """``uri`` relative to the stage folder (how the index and the manifest name shards)."""
    prefix = storage.join(stage_uri, "")
    return uri[len(prefix):].lstrip("/") if uri.startswith(prefix) else uri


def annotate(reports: list[dict], shard_rel: str, table: pa.Table, extra_columns: Iterable[str] = ()) -> None:
    """Add where each committed item now lives to its ok report (``shard`` relative to the stage folder,
    ``row``, ``shard_rows``, plus ``extra_columns`` copied from the shard's own columns)."""
    ids = table.column(ID).to_pylist()
    extras = {c: table.column(c).to_pylist() for c in extra_columns}
    where = {i: r for r, i in reversed(list(enumerate(ids)))}  # first row of an id
    for rep in reports:
        r = where.get(rep[ID]) if rep.get("ok") else None
        if r is not None:
            rep.update(shard=shard_rel, row=r, shard_rows=len(ids), **{c: v[r] for c, v in extras.items()})


@dataclass
class CommitIndex:
    """item id -> (shard relative path, row, *extra column values) for one stage's committed rows."""

    stage_uri: str
    extra_columns: tuple[str, ...] = ()
    entries: dict[str, tuple] = field(default_factory=dict)
    shard_rows: dict[str, int] = field(default_factory=dict)  # rows physically in each known shard
    reads: int = 0  # objects read by load() (lists included): what resume costs

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, stage_uri: str, extra_columns: Iterable[str] = ()) -> "CommitIndex":
        """Compact index + run parts; the shard listing only when a run started after the last compaction
        (every run saves its part before its first batch, so no part means no shard the index lacks)."""
        idx = cls(stage_uri, tuple(extra_columns))
        compact = storage.join(stage_uri, INDEX_FILE)
        idx.reads += 1
        has_compact = storage.exists(compact)
        if has_compact:
            idx.reads += 1
            idx._add_table(storage.read_parquet(compact))
        parts = storage.list_files(storage.join(stage_uri, PARTS_DIR), suffix=".parquet")
        idx.reads += 1
        for part in parts:
            idx.reads += 1
            idx._add_table(storage.read_parquet(part))
        if parts or not has_compact:
            idx._scan_uncovered_shards()
        return idx

    def _add_table(self, t: pa.Table) -> None:
        rows = zip(*(t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows
                     for c in (ID, *BASE_COLUMNS, *self.extra_columns)))
        for item, shard, row, n, *extra in rows:
            self.shard_rows[shard] = int(n)
            self.entries.setdefault(item, (shard, int(row), *extra))

    def _scan_uncovered_shards(self) -> None:
        """Read the shards no index names (or names in part): a killed run's last, unsaved batches."""
        covered = Counter(s for s, *_ in self.entries.values())
        self.reads += 1
        for uri in storage.list_files(storage.join(self.stage_uri, SHARD_DIR), suffix=".parquet"):
            rel = relative(self.stage_uri, uri)
            if rel in self.shard_rows and covered[rel] >= self.shard_rows[rel]:
                continue
            self.reads += 1
            t = storage.read_parquet(uri, columns=[ID, *self.extra_columns])
            self.shard_rows[rel] = t.num_rows
            cols = [t.column(c).to_pylist() for c in (ID, *self.extra_columns)]
            for r, (item, *extra) in enumerate(zip(*cols)):
                self.entries.setdefault(item, (rel, r, *extra))

    # ------------------------------------------------------------------ queries
    def __contains__(self, item_id: str) -> bool:
        return item_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def pending(self, items: list[dict]) -> list[dict]:
        return [it for it in items if it[ID] not in self.entries]

    def shard_uri(self, item_id: str) -> str:
        return storage.join(self.stage_uri, self.entries[item_id][0])

    def to_table(self) -> pa.Table:
        items = list(self.entries)
        vals = list(zip(*self.entries.values())) if items else [[]] * (2 + len(self.extra_columns))
        counts = Counter(vals[0])
        cols = {ID: pa.array(items, pa.string()), "shard": pa.array(vals[0], pa.string()),
                "row": pa.array(vals[1], pa.int64()), "shard_rows": pa.array([counts[s] for s in vals[0]], pa.int64())}
        for c, v in zip(self.extra_columns, vals[2:]):
            cols[c] = pa.array(list(v))
        return pa.table(cols)

    # ------------------------------------------------------------------ finalize
    def dedupe(self) -> dict[str, int]:
        """Make every item live in exactly one shard (its first), rewriting or deleting shards holding
        copies (a killed run and its re-run batched the same item differently); returns shard -> rows."""
        assigned = Counter(s for s, *_ in self.entries.values())
        for rel, n in sorted(self.shard_rows.items()):
            if assigned[rel] >= n:
                continue
            uri = storage.join(self.stage_uri, rel)
            if not assigned[rel]:
                storage.delete(uri)
                continue
            table = storage.read_parquet(uri)
            keep = [self.entries.get(i, ("",))[0] == rel and self.entries[i][1] == r
                    for r, i in enumerate(table.column(ID).to_pylist())]
            table = table.filter(pa.array(keep))
            storage.write_parquet(uri, table, row_group_size=1)
            for r, i in enumerate(table.column(ID).to_pylist()):
                self.entries[i] = (rel, r, *self.entries[i][2:])
        return {rel: assigned[rel] for rel in sorted(assigned)}

    def save_compact(self) -> None:
        """Write ``index.parquet`` (all entries), then drop the run parts it replaces."""
        storage.write_parquet(storage.join(self.stage_uri, INDEX_FILE), self.to_table())
        storage.delete_dir(storage.join(self.stage_uri, PARTS_DIR))


def reset(stage_uri: str) -> None:
    """Forget a stage's committed rows: manifest, shards and indexes (its settings changed)."""
    storage.delete(storage.join(stage_uri, storage.MANIFEST_NAME))
    storage.delete(storage.join(stage_uri, INDEX_FILE))
    storage.delete_dir(storage.join(stage_uri, PARTS_DIR))
    storage.delete_dir(storage.join(stage_uri, SHARD_DIR))


class IndexWriter:
    """Driver side: collects the entries actors report and saves them as this run's part, every
    ``SAVE_EVERY_S`` and at the end, so a killed driver loses at most that much indexing (never data:
    uncovered shards are read on the next load)."""

    def __init__(self, stage_uri: str, extra_columns: Iterable[str] = ()):
        self.extra_columns = tuple(extra_columns)
        self.uri = storage.join(stage_uri, PARTS_DIR, f"run-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
                                                       ".parquet")
        self.rows: dict[str, list] = {c: [] for c in (ID, *BASE_COLUMNS, *self.extra_columns)}
        self.dirty = True
        self.save()  # before any batch: tells the next load that shards may exist beyond the compact index

    def add(self, report: dict) -> None:
        if not report.get("ok") or not isinstance(report.get("shard"), str):  # failed, or not annotated
            return
        for c, v in self.rows.items():
            v.append(_plain(report.get(c)))
        self.dirty = True
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        if not self.dirty:
            return
        t = pa.table({c: pa.array(v, pa.string() if c in (ID, "shard") else None)
                      for c, v in self.rows.items()})
        storage.write_parquet(self.uri, t)
        self.saved_at, self.dirty = time.monotonic(), False


def _plain(v):
    """pandas/numpy report values -> Python values Arrow takes (ints, lists)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
