"""A job spec end to end on local Ray, every artifact in an S3 bucket (SeaweedFS), with a user's own 3-class set.

One run covers both the demo-shaped pipeline (every stage, S3, re-run skips everything, staleness) and a
``data.classes_file`` through every stage (issue: the user's own dataset), because each pipeline run costs
minutes on a small CI machine.
"""
import json

import numpy as np
import pytest

from diclip import storage, viz
from diclip.data.map_shards import CorrelationStore
from diclip.models.kv_cache import load_cache
from ray_jobs.pipeline import pictures_of, run_pipeline
from ray_jobs.planning import plan
from tests.helpers import SHAPES_CLASS_FILE, tiny_spec

pytestmark = pytest.mark.timeout(900)

CLASSES = ["background", "ball", "box"]
FAST = [
    "generate.images_per_class=2", "generate.num_inference_steps=2", "cache.allow_missing_classes=true",
    "train.max_iters=4", "train.eval_every=2", "train.log_every=1", "train.val_limit=4",
    "evaluate.scales=[1.0]", "evaluate.num_pictures=2", "evaluate.export_pseudo_labels=true",
    "train.num_workers=1",  # two workers through S3: test_train's s3_run
]  # (one actor per pool stage: tiny_spec's default)


def test_a_stage_run_will_recompute_makes_the_stages_reading_its_output_stale(tmp_path):
    """``validate`` lists a stale stage and the ones that read its output (their own inputs still match,
    but ``run`` will change them), with the reason."""
    from ray_jobs.stages import synthesize
    from ray_jobs.planning import plan_details, producers, stale_settings

    small = ["synthesize.num_train=2", "synthesize.num_val=1", "synthesize.image_size=[32,32]"]
    spec = tiny_spec(str(tmp_path / "run"), *small)
    assert {n: producers(spec, n) for n in spec.pipeline.stages} == {
        "synthesize": [], "generate": [], "mask": ["generate"], "cache": ["generate", "mask"],
        "correlate": ["synthesize"], "train": ["synthesize", "cache", "correlate"],
        "evaluate": ["synthesize", "correlate", "train"], "infer": ["synthesize", "train"]}
    synthesize.run(spec)
    assert plan_details(spec)[0] == ("synthesize", True, spec.data.root, [])
    changed = tiny_spec(str(tmp_path / "run"), *small, "synthesize.seed=4")
    assert stale_settings(changed, "synthesize") == ["synthesize.seed"]
    # stages with no output yet are simply to run (test_correlate and the end-to-end test below check that
    # complete ones reading a changed output are listed stale)
    assert [(n, done, up) for n, done, _, up in plan_details(changed)] == [(n, False, []) for n in spec.pipeline.stages]
    assert stale_settings(changed, "infer") == []


def test_own_class_set_end_to_end_into_s3(ray_session, s3_bucket, s3_server, tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text(SHAPES_CLASS_FILE)
    spec = tiny_spec(f"{s3_bucket}/demo", f"data.classes_file={path}", *FAST, endpoint_url=s3_server)
    assert not any(done for _, done, _ in plan(spec))
    results = run_pipeline(spec)
    assert all(done for _, done, _ in plan(spec))
    assert [r["stage"] for r in results] == ["synthesize", "generate", "mask", "cache", "correlate", "train",
                                             "evaluate", "infer"]
    assert not any(r.get("skipped") for r in results)
    for stage in ("generate", "mask", "cache", "correlate", "train", "evaluate", "infer"):
        uri = getattr(spec, stage).output
        assert uri.startswith("s3://") and storage.is_complete(uri), stage
    # the data: VOC layout drawn with the file's classes; generate: the file's classes (named ids)
    assert set(storage.read_json(storage.join(spec.data.root, "synthetic.json"))["class_counts"]) == {"ball", "box"}
    assert storage.read_manifest(spec.generate.output).num_items == 4
    cache = load_cache(spec.cache.output, 64, CLASSES)  # refuses a cache of other classes
    assert cache.num_entries > 0 and cache.values.shape[1] == 3
    assert cache.card["sources"]["mask"]["uri"] == spec.mask.output  # the card names the bucket it came from
    store = CorrelationStore(spec.correlate.output)
    assert len(store.index) == 10 and store.get(["synth_val_00000"])[0].grid == (4, 4)  # the 64 px crop square
    metrics = [json.loads(x) for x in storage.read_text(storage.join(spec.train.output, "metrics.jsonl")).splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [2, 4]
    card = storage.read_json(storage.join(spec.train.output, "export", "card.json"))
    assert card["classes"] == CLASSES and card["dataset"] == "shapes" and card["class_set"]["prompt_names"] == ["ball", "box"]
    ev = storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
    assert list(ev["segmentation"]["per_class_iou"]) == CLASSES
    assert np.asarray(ev["cam"]["confusion_matrix"]).shape == (3, 3)
    assert storage.read_bytes(storage.join(spec.evaluate.output, "pictures.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    pseudo = storage.list_files(storage.join(spec.evaluate.output, "pseudo_labels", "SegmentationClassAug"),
                                suffix=".png")
    assert len(pseudo) == 6 and all(viz.decode_mask_png(storage.read_bytes(p)).max() < 3 for p in pseudo)
    masks = storage.list_files(storage.join(spec.infer.output, "masks"), suffix=".png")
    assert len(masks) == 10 and all(viz.decode_mask_png(storage.read_bytes(m)).max() < 3 for m in masks)
    assert storage.read_manifest(spec.infer.output).extra["classes"] == CLASSES
    # a second run finds every stage complete and does nothing
    again = run_pipeline(spec)
    assert all(r.get("skipped") for r in again), again
    # the pictures every drawing stage wrote, listed for people at the end of a run (skipped or not)
    want = [storage.join(spec.mask.output, "preview.png"), storage.join(spec.correlate.output, "preview.png"),
            storage.join(spec.evaluate.output, "pictures.png"), storage.join(spec.infer.output, "overlays")]
    assert pictures_of(results) == pictures_of(again) == want
    # a changed setting makes exactly the stages it affects stale, naming the keys (validate lists them)
    from ray_jobs.planning import stale_settings

    changed = tiny_spec(f"{s3_bucket}/demo", f"data.classes_file={path}", *FAST, "train.lr=0.001",
                        "method.corr_threshold=0.3", endpoint_url=s3_server)
    status = {name: done for name, done, _ in plan(changed)}
    assert status["generate"] and status["synthesize"] and not status["correlate"] and not status["train"]
    assert stale_settings(changed, "correlate") == ["corr_threshold"]
    assert "train.lr" in stale_settings(changed, "train") and "method.corr_threshold" in stale_settings(changed, "train")
    # ... and the stages that read a stale stage's output are stale too: their input will change
    assert not status["evaluate"] and not status["infer"]
    assert stale_settings(changed, "infer") == ["train output will change"]
    assert "train output will change" in stale_settings(changed, "evaluate")
    # editing the classes file (a new CLIP prompt) makes the stages that use the prompts stale; data,
    # generated images and maps stay
    path.write_text(SHAPES_CLASS_FILE.replace("prompt_names: [ball, box]", "prompt_names: [round ball, box]"))
    status = {name: done for name, done, _ in plan(spec)}
    assert status["synthesize"] and status["generate"] and status["correlate"] and not status["mask"] and not status["train"]
