"""A stage's artifacts (DESIGN section 5): ``{stage_uri}/shards/part-*.parquet`` data shards,
``failures.parquet`` (item_id, error) and ``manifest.json`` written last; a stage is complete exactly
when its manifest exists.

Exactly-once under kills and retries:

* each actor call writes **one** shard for its batch, named by a hash of the batch's item ids, with an
  atomic write - a retried batch overwrites the same object, a killed actor leaves nothing visible;
* the call's reports say where each item went; the driver keeps that as the stage's commit index
  (:mod:`diclip.storage.commit_index`), so a (re-)run reads one index instead of every shard and only
  schedules items it does not name;
* :func:`finalize` drops rows whose item id already lives in another shard (possible only if a killed
  run and its re-run batched the same item differently), then writes the compact index, failures and
  manifest.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Iterable

import pyarrow as pa

import diclip
from diclip import storage
from diclip.config import JobSpec, to_dict
from diclip.storage import Manifest, ShardInfo
from diclip.storage.manifest import config_hash
from diclip.storage.commit_index import ID, INDEX_FILE, SHARD_DIR, CommitIndex, annotate, relative


def shard_uri(stage_uri: str, ids: Iterable[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:20]
    return storage.join(stage_uri, SHARD_DIR, f"part-{digest}.parquet")


def write_shard(stage_uri: str, table: pa.Table, row_group_size: int | None = None,
                reports: list[dict] | None = None, index_columns: Iterable[str] = ()) -> str:
    """Atomically write one batch's rows (must include ``item_id``); returns the shard URI.

    ``reports`` (the call's report rows) learn where each committed item now lives, for the driver's
    commit index (:mod:`diclip.storage.commit_index`)."""
    if table.num_rows == 0:
        return ""
    uri = shard_uri(stage_uri, table.column(ID).to_pylist())
    storage.write_parquet(uri, table, row_group_size=row_group_size)
    if reports is not None:
        annotate(reports, relative(stage_uri, uri), table, index_columns)
    return uri


def list_shards(stage_uri: str) -> list[str]:
    return storage.list_files(storage.join(stage_uri, SHARD_DIR), suffix=".parquet")


def committed_ids(stage_uri: str) -> dict[str, str]:
    """item id -> shard URI for every row already committed (first shard wins), from the commit index."""
    index = CommitIndex.load(stage_uri)
    return {i: index.shard_uri(i) for i in index.entries}


def pending_items(items: list[dict], stage_uri: str) -> list[dict]:
    """The items not yet in a committed shard of ``stage_uri`` (resume skips the rest)."""
    return CommitIndex.load(stage_uri).pending(items)


def failure_reasons(failures: list[tuple[str, str]], top: int = 3) -> list[tuple[str, int]]:
    """The most common failure reasons with counts; item ids and numbers are masked so that the same
    problem on different items counts as one reason."""
    from collections import Counter

    def reason(item_id: str, error: str) -> str:
        text = error
        for name in {item_id, item_id.rsplit("/", 1)[-1]} - {""}:  # "seg/<id>" tasks name files by <id>
            text = text.replace(name, "<item>")
        text = re.sub(r"\S*<item>\S*", "<item>", text)
        return re.sub(r"\d+", "N", text)[:160]

    return Counter(reason(i, e) for i, e in failures).most_common(top)


def check_failures(stage: str, committed: int, failures: list[tuple[str, str]], max_fraction: float) -> None:
    """Raise :class:`StageFailed` (one line, top reasons with counts) when too many items failed."""
    from diclip.errors import StageFailed

    total = committed + len(failures)
    if not failures or total == 0 or len(failures) / total <= max_fraction:
        return
    top = "; ".join(f"{n}x {r}" for r, n in failure_reasons(failures))
    raise StageFailed(f"{stage}: {len(failures)} of {total} items failed ({100 * len(failures) / total:.0f}% > "
                      f"max_failed_fraction {100 * max_fraction:g}%), so the stage is not complete (no manifest); "
                      f"top reasons: {top}")


def finalize(stage_uri: str, stage: str, spec: JobSpec, section: Any, failures: list[tuple[str, str]],
             models: dict[str, str] | None = None, extra: dict | None = None,
             before_commit: Callable[[], None] | None = None, index_columns: Iterable[str] = ()) -> Manifest:
    """Dedupe shards, write ``failures.parquet`` then ``manifest.json`` (last: the commit point).

    More failures than the stage's ``max_failed_fraction`` write the failures but no manifest and
    raise :class:`~diclip.errors.StageFailed`: the stage stays incomplete and exits non-zero.
    ``before_commit`` is a stage's own last check (e.g. an export's completeness); raising there
    leaves the stage incomplete the same way."""
    index = CommitIndex.load(stage_uri, index_columns)
    shards = [ShardInfo(path=rel, rows=n) for rel, n in index.dedupe().items()]
    index.save_compact()
    storage.write_failures(stage_uri, failures)
    check_failures(stage, sum(s.rows for s in shards), failures, getattr(section, "max_failed_fraction", 1.0))
    if before_commit is not None:
        before_commit()
    cfg = to_dict(section)
    manifest = Manifest(
        stage=stage,
        shards=shards,
        num_items=sum(s.rows for s in shards),
        num_failed=len(failures),
        config=cfg,
        config_hash=config_hash(cfg),
        package_version=diclip.__version__,
        models=models or {},
        extra={**(extra or {}), "commit_index": INDEX_FILE},
    )
    storage.write_manifest(stage_uri, manifest)
    return manifest


def read_stage_table(stage_uri: str, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a complete stage, via its manifest."""
    manifest = storage.read_manifest(stage_uri)
    if manifest is None:
        from diclip.errors import StorageError

        raise StorageError(f"stage output {stage_uri} is not complete (no manifest.json); run that stage first")
    tables = [storage.read_parquet(storage.join(stage_uri, s.path), columns=columns) for s in manifest.shards]
    if not tables:
        return pa.table({ID: pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default")
