"""A user's own 3-class set (data.classes_file) through every stage, on VOC-layout data."""
import numpy as np
import pytest

from diclip import storage, viz
from diclip.models.kv_cache import load_cache
from ray_jobs.pipeline import run_pipeline
from tests.helpers import SHAPES_CLASS_FILE, tiny_spec

pytestmark = pytest.mark.timeout(900)

CLASSES = ["background", "ball", "box"]
SMALL = [
    "synthesize.num_train=4", "synthesize.num_val=2",
    "generate.images_per_class=2", "generate.num_inference_steps=2", "cache.allow_missing_classes=true",
    "train.num_workers=1", "train.max_iters=2", "train.eval_every=2", "train.log_every=1", "train.val_limit=2",
    "evaluate.scales=[1.0]", "evaluate.num_pictures=1", "evaluate.crf=false", "evaluate.export_pseudo_labels=true",
    # one actor per stage: on a small CI machine actor start-up (a model load each) is most of the time
    *(f"{s}.resources.concurrency=1" for s in ("generate", "mask", "cache", "correlate", "evaluate", "infer")),
    *(f"{s}.resources.batch_size=8" for s in ("generate", "mask", "cache", "correlate", "evaluate", "infer")),
]


def test_three_class_set_end_to_end(ray_session, tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text(SHAPES_CLASS_FILE)
    spec = tiny_spec(str(tmp_path / "run"), f"data.classes_file={path}", *SMALL)
    results = run_pipeline(spec)
    assert [r["stage"] for r in results] == ["synthesize", "generate", "mask", "cache", "correlate", "train",
                                             "evaluate", "infer"]
    # the data: VOC layout, 2-wide labels, mask ids within 0..2
    assert set(storage.read_json(storage.join(spec.data.root, "synthetic.json"))["class_counts"]) == {"ball", "box"}
    # generate: the file's classes (named ids), prompts from its generation words
    gen = storage.read_manifest(spec.generate.output)
    assert gen.num_items == 4
    cache = load_cache(spec.cache.output, 64, CLASSES)  # refuses a cache of other classes
    assert cache.values.shape[1] == 3
    card = storage.read_json(storage.join(spec.train.output, "export", "card.json"))
    assert card["classes"] == CLASSES and card["dataset"] == "shapes" and card["class_set"]["prompt_names"] == ["ball", "box"]
    ev = storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
    assert list(ev["segmentation"]["per_class_iou"]) == CLASSES
    assert np.asarray(ev["cam"]["confusion_matrix"]).shape == (3, 3)
    pseudo = storage.list_files(storage.join(spec.evaluate.output, "pseudo_labels", "SegmentationClassAug"),
                                suffix=".png")
    assert len(pseudo) == 4 and all(viz.decode_mask_png(storage.read_bytes(p)).max() < 3 for p in pseudo)
    masks = storage.list_files(storage.join(spec.infer.output, "masks"), suffix=".png")
    assert len(masks) == 6 and all(viz.decode_mask_png(storage.read_bytes(m)).max() < 3 for m in masks)
    assert storage.read_manifest(spec.infer.output).extra["classes"] == CLASSES
    # editing the file (a new CLIP prompt) makes the stages that use the prompts stale; data, generated
    # images and maps stay
    path.write_text(SHAPES_CLASS_FILE.replace("prompt_names: [ball, box]", "prompt_names: [round ball, box]"))
    from ray_jobs.pipeline import plan

    status = {name: done for name, done, _ in plan(spec)}
    assert status["synthesize"] and status["generate"] and status["correlate"] and not status["mask"] and not status["train"]
