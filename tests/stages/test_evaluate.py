"""Stages ``evaluate`` and ``infer`` on the synthetic data with a tiny exported model (no Ray Train)."""
import io
import os

import numpy as np
import sys

import pytest
import torch
from PIL import Image

from diclip import storage, viz
from diclip.data import class_set_for, get_class_set, open_dataset, open_split
from diclip.errors import ConfigError, StageFailed
from diclip.inference import MapSource, cam_pseudo_labels, load_exported_model, resize_square, segment, \
    segmenter_forward
from diclip.method.metrics import confusion_matrix
from ray_jobs.stages import correlate, evaluate, evaluate_report, infer, synthesize
from ray_jobs.runtime.shards import list_shards, read_stage_table
from ray_jobs.runtime.lineage import recorded_settings
from tests.helpers import tiny_spec
from tests.method.test_inference import make_export

pytestmark = pytest.mark.timeout(600)
EVAL = ["evaluate.resources.concurrency=2", "evaluate.resources.batch_size=1", "evaluate.num_pictures=3",
        "evaluate.export_pseudo_labels=true", "evaluate.scales=[0.7,1.0,1.5]"]


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    spec = tiny_spec(str(tmp_path_factory.mktemp("evaluate") / "run"), *EVAL)
    synthesize.run(spec)
    correlate.run(spec)
    make_export(spec)
    return spec


@pytest.fixture(scope="module")
def evaluated(prepared):
    return prepared, evaluate.run(prepared)


def _png(uri):
    return Image.open(io.BytesIO(storage.read_bytes(uri)))


def test_evaluate_writes_every_output(evaluated):
    spec, summary = evaluated
    out = spec.evaluate.output
    assert summary["failed"] == 0 and summary["seg_images"] == 4 and summary["cam_images"] == 6
    # inputs stream in from CPU tasks, so an actor that starts after they are drained may get none
    assert summary["computed_now"] == 4 + 6 + 3 and summary["actors_used"] in (1, 2)
    m = storage.read_json(storage.join(out, "metrics.json"))
    classes = list(get_class_set("synthetic").classes)
    for task in ("segmentation", "cam"):
        s = m[task]
        assert set(s["per_class_iou"]) == set(classes) and 0 <= s["miou"] <= 1 and 0 <= s["pixel_accuracy"] <= 1
        assert np.asarray(s["confusion_matrix"]).shape == (5, 5)
    assert m["segmentation"]["pixels"] == 4 * 64 * 80 and m["cam"]["pixels"] == 6 * 64 * 80
    report = storage.read_text(storage.join(out, "report.md"))
    assert "| **mIoU** |" in report and "| ball |" in report and "CAM IoU" in report
    # CRF on (the protocol's default): the mIoU before CRF is reported too, as the reference does
    assert spec.evaluate.crf and 0 <= m["segmentation"]["before_crf"]["miou"] <= 1 and "mIoU before CRF" in report
    assert ("**random models**" in report) == (not spec.model.clip.pretrained)  # the tiny test models are random
    pic = _png(storage.join(out, "pictures.png"))
    width = viz.grid_size(3, 4, evaluate_report.PICTURE_CELL)[0]
    legend_rows = (pic.size[1] - viz.grid_size(3, 4, evaluate_report.PICTURE_CELL)[1] - viz.GRID_PAD) // viz.LEGEND_LINE
    assert pic.format == "PNG" and pic.size[0] == width and legend_rows >= 1  # rows, then the class legend
    manifest = storage.read_manifest(out)
    assert manifest.num_items == 13 and manifest.num_failed == 0 and manifest.stage == "evaluate"
    assert len(manifest.shards) == 13  # batch size 1: one shard per item
    rows = read_stage_table(out).to_pylist()
    seg = [r for r in rows if r["task"] == "seg"]
    assert all(viz.decode_mask_png(r["png"]).shape == (64, 80) for r in seg)
    # pseudo-labels for the multi-stage protocol: VOC layout, palette PNGs of class ids
    ds = open_dataset(spec.data.root, "train", get_class_set("synthetic"))
    folder = storage.join(out, "pseudo_labels", "SegmentationClassAug")
    for i in ds.ids:
        img = _png(storage.join(folder, f"{i}.png"))
        assert img.mode == "P" and img.size == (80, 64) and np.asarray(img).max() < 5
    count = storage.read_json(storage.join(out, "pseudo_labels", "export.json"))
    assert count == {"split": "train", "folder": folder, "expected": 6, "written": 6, "missing": []}
    assert manifest.extra["pseudo_labels"] == manifest.extra["pseudo_labels_expected"] == 6
    assert storage.read_failures(out) == []


def test_distributed_totals_equal_single_process(evaluated):
    """Two actors' per-row int64 matrices, summed by the driver == one process over the same images."""
    spec, _ = evaluated
    m = storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
    cs = get_class_set("synthetic")
    threads = torch.get_num_threads()
    # as the actors (num_cpus 0.5 -> 1 thread), from model construction on (the class text features
    # are computed there): the same kernels give the same bits
    torch.set_num_threads(1)
    try:
        model, mspec, _ = load_exported_model(spec.evaluate.checkpoint, dataset="synthetic")
        seg_cm, raw_cm = np.zeros((5, 5), np.int64), np.zeros((5, 5), np.int64)
        for s in open_dataset(spec.data.root, "val", cs):
            e = spec.evaluate
            raw: list = []
            pred = segment(segmenter_forward(model), [s.image], 64, e.scales, flip=e.flip, work_ratio=e.work_ratio,
                           voc_flip_quirk=e.voc_flip_quirk, crf=e.crf, raw_out=raw)[0]
            seg_cm += confusion_matrix(s.mask, pred, 5)
            raw_cm += confusion_matrix(s.mask, raw[0], 5)
        cam_cm = np.zeros((5, 5), np.int64)
        maps = MapSource("stored", mspec, 16, correlation_uri=spec.correlate.output)
        for s in open_dataset(spec.data.root, "train", cs):
            x = resize_square(s.image, 64)[None]
            corr, rar, grid = maps([s.id], x, [s.image.shape[:2]])
            res = cam_pseudo_labels(model, x, torch.from_numpy(s.label)[None], corr, rar, grid, [s.image.shape[:2]])
            cam_cm += confusion_matrix(s.mask, res[0].label, 5)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.asarray(m["segmentation"]["confusion_matrix"], np.int64), seg_cm)
    assert np.array_equal(np.asarray(m["cam"]["confusion_matrix"], np.int64), cam_cm)
    from diclip.method.metrics import summarize

    assert m["segmentation"]["before_crf"]["miou"] == pytest.approx(summarize(raw_cm, cs.classes)["miou"])
    assert seg_cm.sum() == 4 * 64 * 80 and cam_cm.sum() == 6 * 64 * 80


def test_evaluate_resume_recomputes_only_missing_items(evaluated):
    spec, first = evaluated
    out = spec.evaluate.output
    before = storage.read_json(storage.join(out, "metrics.json"))
    again = evaluate.run(spec)
    assert again["computed_now"] == 0 and again["seg_miou"] == first["seg_miou"]
    shard = list_shards(out)[0]
    lost = storage.read_parquet(shard, columns=["item_id"]).column("item_id").to_pylist()
    storage.delete(shard)
    storage.delete(storage.join(out, "metrics.json"))
    third = evaluate.run(spec)
    assert third["computed_now"] == len(lost) == 1
    after = storage.read_json(storage.join(out, "metrics.json"))
    for task in ("segmentation", "cam"):
        assert after[task]["confusion_matrix"] == before[task]["confusion_matrix"]


def test_config_errors_fail_before_ray(prepared, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        for name in ("pydensecrf", "pydensecrf.densecrf", "denseCRF"):  # as on a machine without the package
            m.setitem(sys.modules, name, None)
        spec = tiny_spec(prepared.output_uri, "evaluate.crf=true", f"evaluate.output={tmp_path}/crf")
        with pytest.raises(ConfigError) as e:
            evaluate.run(spec)
        assert "pydensecrf2" in str(e.value) and "\n" not in str(e.value)
    spec = tiny_spec(prepared.output_uri, f"evaluate.correlation={tmp_path}/none", f"evaluate.output={tmp_path}/nomaps")
    with pytest.raises(ConfigError) as e:
        evaluate.run(spec)
    assert "run the correlate stage" in str(e.value) and "\n" not in str(e.value)


def test_pseudo_label_shortfall_fails_the_stage_naming_the_missing_ids(prepared, tmp_path):
    """One corrupt training image: its CAM item fails (within max_failed_fraction), so its pseudo-label is
    missing; the stage writes no manifest and names the id. Repaired, the re-run computes only that item."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(prepared.data.root, root)
    victim = open_dataset(str(root), "train", get_class_set("synthetic")).ids[2]
    good = (root / "JPEGImages" / f"{victim}.jpg").read_bytes()
    (root / "JPEGImages" / f"{victim}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    spec = tiny_spec(prepared.output_uri, *EVAL, f"data.root={root}", f"evaluate.output={tmp_path}/ev",
                     "evaluate.cam=false", "evaluate.crf=false", "evaluate.scales=[1.0]",
                     "evaluate.resources.concurrency=1", "evaluate.resources.batch_size=4",
                     "evaluate.max_failed_fraction=0.5")
    with pytest.raises(StageFailed) as e:
        evaluate.run(spec)
    msg = str(e.value)
    assert msg.startswith("evaluate: pseudo-label export incomplete: 5 of 6 masks of split 'train'") and "\n" not in msg
    assert msg.split("missing: ")[1].startswith(f"{victim};")
    out = spec.evaluate.output
    assert not storage.is_complete(out)
    assert [f[0] for f in storage.read_failures(out)] == [f"cam/{victim}"]
    assert storage.read_json(storage.join(out, "pseudo_labels", "export.json"))["missing"] == [victim]
    (root / "JPEGImages" / f"{victim}.jpg").write_bytes(good)
    again = evaluate.run(spec)
    assert again["computed_now"] == 1 and again["pseudo_labels"] == 6 and storage.is_complete(out)


def test_shortfall_message_lists_a_truncated_id_list(tmp_path):
    spec = tiny_spec(str(tmp_path / "run"), "evaluate.export_pseudo_labels=true")
    ids = [f"img{i:03d}" for i in range(30)]
    folder = storage.join(spec.evaluate.output, *evaluate_report.PSEUDO_DIR)
    for i in ids[:12]:
        storage.write_bytes(storage.join(folder, f"{i}.png"), viz.encode_mask_png(np.zeros((2, 2), np.uint8)))
    storage.write_bytes(storage.join(folder, "stale_other.png"), b"x")  # not in the split: not counted
    record = evaluate_report.pseudo_label_export(spec, ids)
    assert (record["expected"], record["written"], record["missing"]) == (30, 12, ids[12:])
    with pytest.raises(StageFailed) as e:
        evaluate_report.require_complete_export(record)
    msg = str(e.value)
    assert "12 of 30 masks" in msg and f"missing: {', '.join(ids[12:22])} (+8 more);" in msg and "\n" not in msg
    evaluate_report.require_complete_export(evaluate_report.pseudo_label_export(spec, ids[:12]))  # complete: no error


def _write(path, img: Image.Image, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)


def test_infer_masks_overlays_odd_sizes_corrupt_and_resume(prepared, tmp_path):
    src = tmp_path / "images"
    rng = np.random.default_rng(0)
    _write(str(src / "gray.png"), Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)))  # L, 37x53
    _write(str(src / "rgba.png"), Image.fromarray(rng.integers(0, 256, (45, 31, 4), dtype=np.uint8)))  # RGBA
    _write(str(src / "sub" / "photo.JPG"), Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)), "JPEG")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "notes.txt").write_text("ignored")
    phone = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))  # stored 60 wide x 40 high
    exif = phone.getexif()
    exif[0x0112] = 6  # displayed rotated: 40 wide x 60 high
    phone.save(src / "phone.jpg", format="JPEG", exif=exif.tobytes())
    spec = tiny_spec(prepared.output_uri, f"infer.input={src}", f"infer.output={tmp_path}/infer",
                     "infer.scales=[0.7,1.0]", "infer.resources.batch_size=4", "infer.max_failed_fraction=0.25")
    summary = infer.run(spec)
    assert summary["images"] == 4 and summary["failed"] == 1 and summary["segmented_now"] == 4
    out = spec.infer.output
    sizes = {"gray": (53, 37), "rgba": (31, 45), "sub/photo": (90, 70), "phone": (40, 60)}  # masks as displayed
    for name, size in sizes.items():
        mask = _png(storage.join(out, "masks", f"{name}.png"))
        assert mask.mode == "P" and mask.size == size and np.asarray(mask).max() < 5
        ov = _png(storage.join(out, "overlays", f"{name}.jpg"))
        assert ov.format == "JPEG" and ov.size == size
    failures = storage.read_failures(out)
    assert len(failures) == 1 and failures[0][0] == "broken" and "cannot decode" in failures[0][1]
    manifest = storage.read_manifest(out)
    assert sorted(read_stage_table(out).column("item_id").to_pylist()) == sorted(sizes)
    assert manifest.extra["classes"] == list(get_class_set("synthetic").classes)
    # resume: nothing recomputed (the corrupt image is retried and fails again) ...
    again = infer.run(spec)
    assert again["segmented_now"] == 0 and again["images"] == 4 and again["failed"] == 1
    # ... and a deleted mask is the only thing redone
    storage.delete(storage.join(out, "masks", "gray.png"))
    third = infer.run(spec)
    assert third["segmented_now"] == 1 and _png(storage.join(out, "masks", "gray.png")).size == (53, 37)
    assert recorded_settings(out)["scales"] == [0.7, 1.0]  # the one record of what the masks were made with


def test_crf_in_cpu_tasks_gives_the_masks_of_the_in_actor_path(prepared, tmp_path):
    """Same inputs, dense CRF in Ray Data CPU tasks after the model actors (the default) and inside the actors
    (the old layout): every mask PNG, every confusion matrix (after and before CRF) and the metrics are equal.
    The tasks path ships the working-size fp32 logits with the pixels and the mask: its byte count is exact."""
    common = [*EVAL, "evaluate.cam=false", "evaluate.export_pseudo_labels=false", "evaluate.num_pictures=0",
              "evaluate.resources.batch_size=2"]
    runs = {}
    for placement in ("tasks", "actor"):
        spec = tiny_spec(prepared.output_uri, *common, f"evaluate.crf_placement={placement}",
                         f"evaluate.output={tmp_path}/{placement}")
        assert spec.evaluate.crf
        summary = evaluate.run(spec)
        assert summary["failed"] == 0 and summary["seg_images"] == 4, summary
        rows = {r["item_id"]: r for r in read_stage_table(spec.evaluate.output).to_pylist()}
        runs[placement] = summary, rows, storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
    (tasks, t_rows, t_metrics), (actor, a_rows, a_metrics) = runs["tasks"], runs["actor"]
    assert sorted(t_rows) == sorted(a_rows) and len(t_rows) == 4
    for item_id, row in t_rows.items():
        for col in ("png", "height", "width", "cm_idx", "cm_cnt", "cm_raw_idx", "cm_raw_cnt"):
            assert row[col] == a_rows[item_id][col], (item_id, col)
        assert row["cm_raw_idx"]  # the confusion matrix before CRF is recorded by the tasks too
    assert t_metrics["segmentation"] == a_metrics["segmentation"]
    k, h, w = 5, 64, 80  # synthetic classes, val image size; logits at work ratio 0.4
    lh, lw = int(h * 0.4), int(w * 0.4)
    assert tasks["crf_moved_bytes_per_image"] == k * lh * lw * 4 + h * w * 3 + h * w
    assert actor["crf_moved_bytes_per_image"] == 0


# ----------------------------------------------------------------------------------------------
# the CRF task itself (no Ray): malformed payloads, mixed rows, thread state
# ----------------------------------------------------------------------------------------------
def _pending_row(spec, image_id, k=5, h=64, w=80, ratio=0.4):
    """A pending seg row as an actor ships it: random working-size logits, the image's pixels and mask."""
    from ray_jobs.stages.evaluate_crf import crf_payload

    s = open_split(spec.data, spec.evaluate.split).load(image_id)
    logits = np.random.default_rng(0).standard_normal((k, int(h * ratio), int(w * ratio))).astype(np.float32)
    item = {"item_id": f"seg/{image_id}", "task": "seg", "image_id": image_id,
            "img": np.ascontiguousarray(s.image).tobytes(), "img_h": s.image.shape[0], "img_w": s.image.shape[1],
            "mask": np.ascontiguousarray(s.mask).tobytes()}
    return crf_payload(item, logits) | {"pid": 7, "t_start": 1.0, "t_end": 2.0, "cpu_s": 0.5}


def test_crf_task_fails_only_the_malformed_item_and_passes_actor_reports_through(prepared, tmp_path):
    """A direct call on a pandas block mixing the actor's report rows (one committed cam row, with its shard
    columns; one failed item) and pending seg rows, one of them with a null payload column: that item alone
    fails, once; the others get rows in one shard; the reports pass through; torch threads are restored."""
    import pandas as pd

    from ray_jobs.stages.evaluate_crf import EMPTY_PAYLOAD, crf_task

    spec = tiny_spec(prepared.output_uri, *EVAL, f"evaluate.output={tmp_path}/direct", "evaluate.crf_cpus=2")
    ids = open_split(spec.data, spec.evaluate.split).ids[:3]
    good = [_pending_row(spec, i) for i in ids[:2]]
    bad = _pending_row(spec, ids[2]) | {"crf_logits": None}
    reports = [EMPTY_PAYLOAD | {"item_id": "cam/x", "ok": True, "error": "", "task": "cam", "shard": "s.parquet",
                                "row": 0, "shard_rows": 1, "pid": 7, "t_start": 1.0, "t_end": 2.0, "cpu_s": 0.5},
               EMPTY_PAYLOAD | {"item_id": "seg/broken", "ok": False, "error": "DiclipError: bad image",
                                "task": "seg", "pid": 7, "t_start": 1.0, "t_end": 2.0, "cpu_s": 0.5}]
    threads = torch.get_num_threads()
    out = crf_task(pd.DataFrame(reports + good + [bad]), spec, class_set_for(spec.data).num_classes)
    assert torch.get_num_threads() == threads
    assert sorted(out["item_id"]) == sorted(["cam/x", "seg/broken", *(f"seg/{i}" for i in ids)])
    assert not set(out.columns) & {"crf_logits", "img", "mask", "crf_pending"}
    by_id = {r["item_id"]: r for r in out.to_dict("records")}
    assert by_id["cam/x"]["ok"] and by_id["cam/x"]["shard"] == "s.parquet"  # passed through untouched
    assert not by_id["seg/broken"]["ok"] and by_id["seg/broken"]["error"] == "DiclipError: bad image"
    assert not by_id[f"seg/{ids[2]}"]["ok"] and "TypeError" in by_id[f"seg/{ids[2]}"]["error"]
    assert all(by_id[f"seg/{i}"]["ok"] for i in ids[:2])
    assert by_id[f"seg/{ids[0]}"]["moved_bytes"] == 5 * 25 * 32 * 4 + 64 * 80 * 3 + 64 * 80
    (shard,) = list_shards(spec.evaluate.output)
    assert sorted(storage.read_parquet(shard).column("item_id").to_pylist()) == [f"seg/{i}" for i in sorted(ids[:2])]


def test_crf_task_passes_a_block_without_payload_columns_through(prepared, tmp_path):
    """Blocks differ in columns (shard/row only where the actor committed rows; no payload columns at all):
    a block with nothing pending is returned as is, and nothing is written."""
    import pandas as pd

    from ray_jobs.stages.evaluate_crf import crf_task

    spec = tiny_spec(prepared.output_uri, *EVAL, f"evaluate.output={tmp_path}/plain")
    block = pd.DataFrame([{"item_id": "cam/a", "ok": True, "error": "", "task": "cam", "pid": 1},
                          {"item_id": "pic/a", "ok": False, "error": "x", "task": "pic", "pid": 1}])
    out = crf_task(block, spec, class_set_for(spec.data).num_classes)
    assert out.to_dict("records") == block.to_dict("records")
    assert list_shards(spec.evaluate.output) == []


def test_crf_task_without_a_crf_package_fails_in_one_line(prepared, tmp_path, monkeypatch):
    import pandas as pd

    from ray_jobs.stages.evaluate_crf import crf_task

    spec = tiny_spec(prepared.output_uri, *EVAL, f"evaluate.output={tmp_path}/nocrf")
    row = _pending_row(spec, open_split(spec.data, spec.evaluate.split).ids[0])
    for module in ("pydensecrf", "pydensecrf.densecrf", "denseCRF"):
        monkeypatch.setitem(sys.modules, module, None)  # import of these now raises ImportError
    with pytest.raises(ConfigError, match="needs a dense CRF package") as e:
        crf_task(pd.DataFrame([row]), spec, class_set_for(spec.data).num_classes)
    assert "\n" not in str(e.value)


def test_old_style_metrics_are_rebuilt_from_committed_rows(evaluated):
    """A complete output whose metrics.json predates METRICS_VERSION is not complete; a re-run recomputes no
    item and rewrites the summary from the committed rows."""
    spec, _ = evaluated
    uri = storage.join(spec.evaluate.output, "metrics.json")
    new = storage.read_json(uri)
    assert new["metrics_version"] == evaluate_report.METRICS_VERSION and evaluate.is_complete(spec)
    old = {k: v for k, v in new.items() if k != "metrics_version"} | {"segmentation": {"miou": 0.0}}
    storage.write_json(uri, old)
    assert not evaluate.is_complete(spec)
    again = evaluate.run(spec)
    assert again["computed_now"] == 0
    assert storage.read_json(uri) == new and evaluate.is_complete(spec)
