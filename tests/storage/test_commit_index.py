"""The commit index: resume and the training index read one object, not every shard, and stay exactly-once."""
from __future__ import annotations

import pyarrow as pa

from diclip import storage
from diclip.storage import commit_index
from diclip.storage.commit_index import CommitIndex, IndexWriter
from ray_jobs.runtime.item_reports import report_row
from ray_jobs.runtime.shards import write_shard


def commit_batch(stage: str, ids: list[str], writer: IndexWriter | None, crop: int = -1) -> str:
    """What an actor call does: write one shard, annotate its reports; the driver adds them to the index."""
    table = pa.table({"item_id": ids, "value": list(range(len(ids))), "crop": [crop] * len(ids),
                      "geom": [[1, 2, 3]] * len(ids)})
    reports = [report_row(i, True) for i in ids] + [report_row("bad", False, "boom")]
    uri = write_shard(stage, table, reports=reports, index_columns=("crop", "geom"))
    if writer is not None:
        for r in reports:
            writer.add(r)
    return uri


def test_a_complete_stage_loads_from_one_index_whatever_its_shard_count(tmp_path) -> None:
    stage = str(tmp_path / "stage")
    writer = IndexWriter(stage, ("crop", "geom"))
    for b in range(30):
        commit_batch(stage, [f"img{b}-{j}" for j in range(3)], writer, crop=b % 2)
    writer.save()
    idx = CommitIndex.load(stage, ("crop", "geom"))
    assert len(idx) == 90 and idx.reads == 4  # compact probe, part list, one part, shard list: no shard read
    assert idx.entries["img7-2"][1:] == (2, 1, [1, 2, 3])
    assert storage.read_parquet_rows(idx.shard_uri("img7-2"), [idx.entries["img7-2"][1]]).column(
        "item_id").to_pylist() == ["img7-2"]
    assert set(idx.dedupe().values()) == {3}
    idx.save_compact()
    again = CommitIndex.load(stage, ("crop", "geom"))
    assert again.entries == idx.entries and again.reads == 3  # the compact index only: no listing of shards
    assert idx.pending([{"item_id": "img0-0"}, {"item_id": "new"}]) == [{"item_id": "new"}]


def test_shards_a_killed_run_never_indexed_are_read_and_only_those(tmp_path) -> None:
    stage = str(tmp_path / "stage")
    w = IndexWriter(stage)
    for b in range(5):
        commit_batch(stage, [f"a{b}"], w)
    w.save()
    CommitIndex.load(stage).save_compact()
    IndexWriter(stage)  # a new run starts (saves its empty part) ...
    commit_batch(stage, ["late1", "late2"], None)  # ... and is killed after writing a shard it never reported
    idx = CommitIndex.load(stage)
    assert {"late1", "late2"} <= set(idx.entries) and len(idx) == 7
    assert idx.reads == 6  # compact probe + read, part list + the empty part, shard list, the one unindexed shard


def test_an_item_committed_twice_ends_in_exactly_one_shard_with_rows_renumbered(tmp_path) -> None:
    stage = str(tmp_path / "stage")
    w = IndexWriter(stage)
    first = commit_batch(stage, ["x", "y"], w)
    w.save()
    second = commit_batch(stage, ["q", "y", "z"], None)  # a re-run batched y again, with others
    idx = CommitIndex.load(stage)
    rows = idx.dedupe()
    assert sum(rows.values()) == 4 and idx.shard_uri("y") == first
    table = storage.read_parquet(second)
    assert table.column("item_id").to_pylist() == ["q", "z"]
    assert [idx.entries[i][1] for i in ("q", "z")] == [0, 1]
    idx.save_compact()
    assert not storage.list_files(storage.join(stage, commit_index.PARTS_DIR))
    assert CommitIndex.load(stage).entries == idx.entries


def test_reset_forgets_everything(tmp_path) -> None:
    stage = str(tmp_path / "stage")
    w = IndexWriter(stage)
    commit_batch(stage, ["x"], w)
    w.save()
    CommitIndex.load(stage).save_compact()
    commit_index.reset(stage)
    assert len(CommitIndex.load(stage)) == 0
