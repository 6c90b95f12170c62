"""Driver cost per item at 1k, 10k and 100k items: list a split, plan a run, resume, build the training index.

What a COCO-size run (123k images, ~530k maps with a 5-crop bank) asks of the driver, which runs on one CPU:
each N is a synthetic VOC-layout split (ids and labels only - nothing here opens an image) whose correlate
output is fully committed with the real code path (``write_shard`` with annotated reports, the driver's
``IndexWriter``, ``finalize``), in shards of ``correlate.resources.batch_size`` small records. Then, timed:

* list   - ``open_split(...).ids`` (the split list and labels file);
* plan   - ``correlate.list_items`` + ``settings`` (the item list a run schedules);
* resume - the manifest check plus ``pending_items`` (what a re-run reads to find nothing left to do),
           with the number of objects it read; and, for contrast, the per-shard scan resume used before
           the commit index (reading every shard's id column);
* train index - ``build_items`` (item -> shard/row and labels, what the train stage hands its workers).

Local disk here; on S3 every read is a round trip (~10-30 ms), so the read counts matter more than the
seconds. Last line: ``100k items: list X s, resume X s, train index X s``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import write_result

SIZES = (1_000, 10_000, 100_000)
BATCH = 8  # items per shard, as configs/coco.yaml's correlate batch


def make_split(root: Path, n: int) -> None:
    """ImageSets/Segmentation/train.txt + cls_labels.json for ``n`` ids (no images: nothing opens one)."""
    import numpy as np

    ids = [f"img{i:07d}" for i in range(n)]
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    rng = np.random.default_rng(0)
    labels = {i: [int(v) for v in rng.integers(0, 2, 4)] for i in ids}
    (root / "cls_labels.json").write_text(json.dumps(labels))


def commit_all(spec, items: list[dict]) -> None:
    """Commit every item through the real code path, ``BATCH`` records per shard."""
    import numpy as np
    import pyarrow as pa

    from diclip.data.map_shards import SCHEMA, pack_npz
    from diclip.storage.commit_index import IndexWriter
    from ray_jobs.runtime.shards import finalize, write_shard
    from ray_jobs.runtime.item_reports import report_row
    from ray_jobs.stages.correlate import INDEX_COLUMNS, STAGE, settings

    out = spec.correlate.output
    blob = pack_npz({"q": np.zeros((1, 4), np.float16)})
    writer = IndexWriter(out, INDEX_COLUMNS)
    for b in range(0, len(items), BATCH):
        batch = items[b:b + BATCH]
        rows = [{"item_id": it["item_id"], "split": "train", "src_h": 8, "src_w": 8, "grid_h": 2, "grid_w": 2,
                 "vce_k": 1, "vce_ids": bytes(4), "vce_rows": bytes(8), "rar_grid_h": 2, "rar_grid_w": 2,
                 "rar_codec": "qk_fp16", "rar": blob, "crop": -1, "geom": []} for it in batch]
        reports = [report_row(it["item_id"], True) for it in batch]
        write_shard(out, pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=1, reports=reports,
                    index_columns=INDEX_COLUMNS)
        for r in reports:
            writer.add(r)
    writer.save()
    cfg = spec.correlate
    finalize(out, STAGE, spec, cfg, [], {}, extra={"splits": list(cfg.splits), "crops_per_image": 0,
                                                   "crop_split": cfg.crop_split, "settings": settings(spec)},
             index_columns=INDEX_COLUMNS)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(n: int, work: Path, scan: bool) -> dict:
    from diclip import storage
    from diclip.config import load_spec
    from diclip.data import open_split
    from diclip.storage.commit_index import CommitIndex
    from diclip.train.data import build_items
    from ray_jobs.stages import correlate
    from ray_jobs.runtime.shards import pending_items

    root = work / f"n{n}"
    make_split(root / "data", n)
    spec = load_spec("configs/tiny.yaml", [f"output_uri={root}", f"data.root={root}/data", "data.labels_file=cls_labels.json",
                                           "correlate.splits=[train]", "correlate.crops_per_image=0",
                                           f"correlate.resources.batch_size={BATCH}"])
    commit_all(spec, correlate.list_items(spec))
    out = spec.correlate.output
    r = {"items": n, "shards": -(-n // BATCH)}
    _, r["list_s"] = timed(lambda: open_split(spec.data, "train").ids)
    items, r["plan_s"] = timed(lambda: (correlate.list_items(spec), correlate.settings(spec))[0])
    pending, r["resume_s"] = timed(lambda: (correlate.stale(spec), pending_items(items, out))[1])
    assert not pending, f"{len(pending)} items pending after a complete commit"
    r["resume_reads"] = CommitIndex.load(out).reads + 1  # + the manifest
    if scan:  # the resume this replaced: every shard's id column
        old = CommitIndex(out)
        _, r["resume_scan_every_shard_s"] = timed(old._scan_uncovered_shards)
        r["resume_scan_reads"] = old.reads
    table, r["train_index_s"] = timed(lambda: build_items(spec, "train", out))
    assert table.num_rows == n
    r["us_per_item"] = {k[:-2]: round(1e6 * r[k] / n, 1) for k in ("list_s", "plan_s", "resume_s", "train_index_s")}
    storage.delete_dir(str(root))
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--no-scan", action="store_true", help="skip the per-shard scan comparison")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="diclip-driver-scale-"))
    rows = []
    for n in args.sizes:
        r = measure(n, work, scan=not args.no_scan)
        rows.append(r)
        scan = (f"; per-shard scan {r['resume_scan_every_shard_s']:.2f} s / {r['resume_scan_reads']} reads "
                f"({r['resume_scan_every_shard_s'] / max(r['resume_s'], 1e-9):.0f}x slower)"
                if "resume_scan_reads" in r else "")
        print(f"{n:>7} items ({r['shards']} shards): list {r['list_s']:.2f} s, plan {r['plan_s']:.2f} s, resume "
              f"{r['resume_s']:.2f} s ({r['resume_reads']} reads{scan}), train index {r['train_index_s']:.2f} s; "
              f"us/item {r['us_per_item']}", flush=True)
    write_result("driver_scale", {"batch": BATCH, "rows": rows})
    last = rows[-1]
    print(f"{last['items'] // 1000}k items: list {last['list_s']:.1f} s, resume {last['resume_s']:.1f} s, "
          f"train index {last['train_index_s']:.1f} s")


if __name__ == "__main__":
    main()
