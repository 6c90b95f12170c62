"""Inference math and the export round trip, without Ray: multi-scale + flip, CAM labels, metrics, CRF, viz."""
import io
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diclip import storage, viz
from diclip.data import get_class_set
from diclip.errors import ConfigError, ModelError
from diclip.inference import (
    build_model, load_exported_model, multiscale_logits, read_export, save_export, scale_sizes, segment,
    segmenter_forward, strongest_class, to_tensor, work_size,
)
from diclip.method import crf as crflib
from diclip.method.metrics import confusion_matrix, summarize
from ray_jobs.runtime.lineage import claim_settings, recorded_settings
from ray_jobs.stages.evaluate_crf import dense_cm, sparse_cm
from tests.helpers import random_cache, tiny_spec

pytestmark = pytest.mark.timeout(300)


def make_export(spec, seed: int = 0):
    """A tiny exported model in the train-export layout at ``spec.evaluate.checkpoint`` (no Ray Train)."""
    classes = list(get_class_set(spec.data.dataset).classes)
    cache = random_cache(64, classes, seed=seed)
    torch.manual_seed(seed)
    model = build_model(spec, cache)
    save_export(spec.evaluate.checkpoint, model, spec, cache, steps=0)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    spec = tiny_spec(str(tmp_path_factory.mktemp("inf") / "run"))
    model = make_export(spec)
    return spec, model


def _images(rng, sizes):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


# ----------------------------------------------------------------------------------------------
# metrics: what evaluate sums
# ----------------------------------------------------------------------------------------------
def test_sparse_per_row_matrices_sum_exactly():
    rng = np.random.default_rng(0)
    gts = [rng.choice([0, 1, 2, 255], size=(7, 9)) for _ in range(5)]
    preds = [rng.integers(0, 4, size=(7, 9)) for _ in range(5)]
    rows = [sparse_cm(confusion_matrix(g, p, 4)) for g, p in zip(gts, preds)]
    total = dense_cm(rows + [([], [])], 4)  # an image without ground truth adds nothing
    assert total.dtype == np.int64
    assert np.array_equal(total, confusion_matrix(np.stack(gts), np.stack(preds), 4))
    assert total.sum() == sum(int((g != 255).sum()) for g in gts)


def test_miou_hand_case_ignore_and_absent_classes():
    # class 3 appears nowhere; class 2 only in the prediction; 255 pixels never count
    gt = np.array([[0, 0, 1, 1], [255, 255, 1, 0]])
    pred = np.array([[0, 2, 1, 1], [3, 2, 0, 0]])
    cm = dense_cm([sparse_cm(confusion_matrix(gt[:1], pred[:1], 4)),
                   sparse_cm(confusion_matrix(gt[1:], pred[1:], 4))], 4)
    s = summarize(cm, ["bg", "a", "b", "c"])
    assert cm.sum() == 6 and s["per_class_iou"]["c"] is None  # only on ignored pixels -> absent
    assert math.isclose(s["per_class_iou"]["bg"], 2 / 4)  # tp 2, gt 3, pred 3 -> 2 / (3 + 3 - 2)
    assert math.isclose(s["per_class_iou"]["a"], 2 / 3)
    assert s["per_class_iou"]["b"] == 0.0  # predicted, never true: IoU 0 ...
    assert math.isclose(s["miou"], (0.5 + 2 / 3) / 2)  # ... but not in the mean (reference evaluate.scores)
    assert math.isclose(s["pixel_accuracy"], 4 / 6)


# ----------------------------------------------------------------------------------------------
# multi-scale + flip
# ----------------------------------------------------------------------------------------------
def test_scale_sizes_and_work_size():
    assert scale_sizes(320, [0.7, 1.0, 1.2, 1.5]) == [224, 320, 384, 480]  # the reference's squares
    assert scale_sizes(64, [0.7, 1.0, 1.5]) == [48, 64, 96]  # rounded to the patch grid
    assert scale_sizes(64, [0.1]) == [16]
    assert work_size((375, 500), 0.4) == (150, 200) and work_size((2, 2), 0.2) == (1, 1)


def _per_pixel_forward(x):
    """Exactly flip-equivariant dummy segmenter: a per-pixel map, then 16x16 max pooling (order-free)."""
    w = torch.tensor([[1.0, -0.5, 0.2], [-0.3, 0.8, 0.1], [0.2, 0.1, -0.9], [0.5, 0.5, 0.5]])
    return F.max_pool2d(torch.einsum("kc,bchw->bkhw", w, x).tanh(), 16)


def _tilted_forward(x):
    """Not flip-equivariant: a horizontal ramp is added to the logits."""
    out = _per_pixel_forward(x)
    return out + torch.linspace(0, 1, out.shape[-1]) * torch.arange(out.shape[1]).view(1, -1, 1, 1)


def test_flip_is_a_no_op_for_flip_equivariant_segmenters(exported):
    spec, model = exported
    rng = np.random.default_rng(1)
    images = [to_tensor(im) for im in _images(rng, [(37, 53), (64, 80), (50, 50)])]
    scales = [0.7, 1.0, 1.5]
    for forward in (_per_pixel_forward,):
        a = multiscale_logits(forward, images, 64, scales, flip=True)
        b = multiscale_logits(forward, images, 64, scales, flip=False)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the real tiny model made symmetric: f(x) = (m(x) + flip(m(flip(x)))) / 2
    seg = segmenter_forward(model)

    def symmetric(x):
        return (seg(x) + seg(x.flip(-1)).flip(-1)) / 2

    a = multiscale_logits(symmetric, images, 64, scales, flip=True)
    b = multiscale_logits(symmetric, images, 64, scales, flip=False)
    # equal up to batch-size-dependent CPU kernels (the flip doubles the batch); the masks agree
    for x, y, im in zip(a, b, images):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    masks = [segment(symmetric, [np.asarray(im.permute(1, 2, 0) * 255, dtype=np.uint8) for im in images], 64, scales,
                     flip=f) for f in (True, False)]
    assert all(np.array_equal(p, q) for p, q in zip(*masks))
    # ... and the check has teeth: for the raw model and a tilted dummy the flip changes the logits
    for forward in (seg, _tilted_forward):
        a = multiscale_logits(forward, images, 64, scales, flip=True)
        b = multiscale_logits(forward, images, 64, scales, flip=False)
        assert not any(torch.allclose(x, y, rtol=0, atol=1e-3) for x, y in zip(a, b))


def test_multiscale_matches_a_hand_computation():
    rng = np.random.default_rng(2)
    img = to_tensor(_images(rng, [(40, 56)])[0])
    got = multiscale_logits(_tilted_forward, [img], 64, [1.0, 1.5], flip=True, work_ratio=0.5)[0]
    want = 0
    for side in (64, 96):
        x = F.interpolate(img[None], size=(side, side), mode="bilinear", align_corners=False)
        lg = F.interpolate(_tilted_forward(x), size=(20, 28), mode="bilinear", align_corners=False)
        fl = F.interpolate(_tilted_forward(x.flip(-1)).flip(-1), size=(20, 28), mode="bilinear", align_corners=False)
        want = want + (lg + fl)[0] / 2
    torch.testing.assert_close(got, want / 2)
    # the reference VOC quirk: no flip at scale 1.0 only
    quirk = multiscale_logits(_tilted_forward, [img], 64, [1.0], flip=True, voc_flip_quirk=True)[0]
    plain = multiscale_logits(_tilted_forward, [img], 64, [1.0], flip=False)[0]
    flipped = multiscale_logits(_tilted_forward, [img], 64, [1.0], flip=True)[0]
    assert torch.equal(quirk, plain) and not torch.allclose(quirk, flipped)


def test_segment_odd_sizes_and_batch_independence(exported):
    spec, model = exported
    rng = np.random.default_rng(3)
    images = _images(rng, [(37, 53), (17, 90), (64, 80)])
    masks = segment(segmenter_forward(model), images, 64, [0.7, 1.0], flip=True)
    assert [m.shape for m in masks] == [(37, 53), (17, 90), (64, 80)]
    assert all(m.dtype == np.uint8 and m.max() < 5 for m in masks)
    alone = segment(segmenter_forward(model), images[:1], 64, [0.7, 1.0], flip=True)[0]
    assert (alone == masks[0]).mean() > 0.99  # batching changes only the last float bits


# ----------------------------------------------------------------------------------------------
# CAM helpers
# ----------------------------------------------------------------------------------------------
def test_strongest_present_class():
    scores = np.zeros((4, 3, 3), np.float32)
    scores[0] = 0.9  # class 1 strongest overall but absent from the label
    scores[2, :2] = 0.5
    scores[3, 0, 0] = 1.0
    assert strongest_class(scores, np.array([0, 0, 1, 1])) == 3
    assert strongest_class(scores, np.zeros(4)) == 0


# ----------------------------------------------------------------------------------------------
# export round trip and one-line errors
# ----------------------------------------------------------------------------------------------
def test_export_round_trip(exported):
    spec, model = exported
    loaded, lspec, card = load_exported_model(spec.evaluate.checkpoint, dataset="synthetic")
    assert card["classes"] == list(get_class_set("synthetic").classes) and lspec.model == spec.model
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x, seg_only=True).seg_logits, loaded(x, seg_only=True).seg_logits)
    info = read_export(spec.evaluate.checkpoint)
    assert info.crop_size == 64 and len(info.fingerprint) == 16


def _one_line(e):
    return "\n" not in str(e.value)


def test_export_errors_are_one_line(exported, tmp_path):
    spec, _ = exported
    with pytest.raises(ModelError) as e:
        load_exported_model(str(tmp_path / "nothing"))
    assert "no exported model" in str(e.value) and _one_line(e)
    with pytest.raises(ModelError) as e:
        load_exported_model(spec.evaluate.checkpoint, dataset="voc")
    assert "class-list mismatch" in str(e.value) and "'voc'" in str(e.value) and _one_line(e)
    bad = str(tmp_path / "bad")
    for name in ("spec.yaml", "card.json", "cache/kv_cache.safetensors", "cache/kv_cache.json"):
        storage.write_bytes(storage.join(bad, name), storage.read_bytes(storage.join(spec.evaluate.checkpoint, name)))
    storage.write_bytes(storage.join(bad, "model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError) as e:
        load_exported_model(bad)
    assert "corrupt" in str(e.value) and _one_line(e)
    storage.write_text(storage.join(bad, "spec.yaml"), "model: {adapter_size: [oops\n")
    with pytest.raises(ModelError) as e:
        read_export(bad)
    assert "spec" in str(e.value) and _one_line(e)
    # a spec written by a diclip with a config key this one does not have
    newer = storage.read_text(storage.join(spec.evaluate.checkpoint, "spec.yaml")) + "future_section: {x: 1}\n"
    storage.write_text(storage.join(bad, "spec.yaml"), newer)
    with pytest.raises(ModelError) as e:
        read_export(bad)
    assert "'future_section'" in str(e.value) and "diclip version" in str(e.value) and _one_line(e)
    # weights of another architecture
    other = tiny_spec(str(tmp_path / "other"), "model.embedding_dim=16")
    make_export(other)
    storage.write_bytes(storage.join(spec.evaluate.checkpoint + "_swapped", "model.safetensors"),
                        storage.read_bytes(storage.join(other.evaluate.checkpoint, "model.safetensors")))
    for name in ("spec.yaml", "card.json", "cache/kv_cache.safetensors", "cache/kv_cache.json"):
        storage.write_bytes(storage.join(spec.evaluate.checkpoint + "_swapped", name),
                            storage.read_bytes(storage.join(spec.evaluate.checkpoint, name)))
    with pytest.raises(ModelError) as e:
        load_exported_model(spec.evaluate.checkpoint + "_swapped")
    assert "does not fit" in str(e.value) and _one_line(e)


def test_results_of_another_config_are_discarded(tmp_path):
    """Evaluate and infer keep their record of "made with what" where every stage does (``settings.json``,
    lineage.claim_settings); the files they write beside their shards go with the shards."""
    out = str(tmp_path / "eval")
    pseudo = storage.join(out, "pseudo_labels", "SegmentationClassAug", "a.png")
    storage.write_bytes(storage.join(out, "shards", "part-x.parquet"), b"x")
    storage.write_bytes(pseudo, b"x")
    claim_settings(out, "evaluate", {"scales": [1.0]}, also_drop=["pseudo_labels"])  # unknown provenance: dropped
    assert not storage.list_files(storage.join(out, "shards")) and not storage.exists(pseudo)
    assert recorded_settings(out) == {"scales": [1.0]}
    storage.write_bytes(storage.join(out, "shards", "part-y.parquet"), b"y")
    storage.write_bytes(pseudo, b"y")
    claim_settings(out, "evaluate", {"scales": [1.0]}, also_drop=["pseudo_labels"])  # same settings: kept
    assert storage.list_files(storage.join(out, "shards")) and storage.exists(pseudo)
    claim_settings(out, "evaluate", {"scales": [1.0, 1.5]}, also_drop=["pseudo_labels"])
    assert not storage.list_files(storage.join(out, "shards")) and not storage.exists(pseudo)
    assert recorded_settings(out) == {"scales": [1.0, 1.5]}
    # a folder of other settings beside no shards (every item failed, or only masks were written) goes too
    storage.write_bytes(pseudo, b"z")
    claim_settings(out, "evaluate", {"scales": [2.0]}, also_drop=["pseudo_labels"])
    assert not storage.exists(pseudo)


# ----------------------------------------------------------------------------------------------
# CRF
# ----------------------------------------------------------------------------------------------
def test_crf_without_a_package_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setitem(sys.modules, "denseCRF", None)
    with pytest.raises(ConfigError) as e:
        crflib.dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5, np.float32))
    assert "pip install pydensecrf2" in str(e.value) and _one_line(e)


def test_real_dense_crf_snaps_noisy_probabilities_to_image_edges():
    """pydensecrf2 (installed by the default set-up) with the reference parameters: probabilities whose
    argmax is wrong on a quarter of the pixels become a clean two-region map along the colour edge."""
    rng = np.random.default_rng(0)
    h, w = 48, 64
    truth = np.zeros((h, w), np.int64)
    truth[:, 27:] = 1
    image = np.where(truth[..., None] == 1, [40, 60, 200], [200, 50, 40]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    p_true = np.clip(rng.normal(0.6, 0.15, (h, w)), 0.05, 0.95)
    prob = np.stack([np.where(truth == 0, p_true, 1 - p_true), np.where(truth == 1, p_true, 1 - p_true)])
    noisy = (prob.argmax(0) == truth).mean()
    assert crflib.crf_backend() == "pydensecrf"
    out = crflib.dense_crf(image, prob.astype(np.float32))
    assert out.shape == (h, w) and out.dtype == np.uint8
    assert noisy < 0.85 and (out == truth).mean() > 0.98
    flat = crflib.dense_crf(np.full((h, w, 3), 128, np.uint8), prob.astype(np.float32))
    assert (flat == truth).mean() < 0.9  # on a featureless image the same CRF cannot find the boundary


# ----------------------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------------------
def test_palette_png_round_trip_and_grid_size():
    mask = np.array([[0, 1, 2], [20, 255, 3]], np.uint8)
    data = viz.encode_mask_png(mask)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    assert np.array_equal(viz.decode_mask_png(data), mask)
    assert viz.colorize(mask)[0, 1].tolist() == [128, 0, 0]
    grid = viz.picture_grid([[np.zeros((10, 30, 3), np.uint8), None], [None, viz.jet(np.eye(5))]], ["a", "b"], cell=40)
    assert grid.size == viz.grid_size(2, 2, 40)
    ov = viz.overlay(np.full((2, 3, 3), 200, np.uint8), mask)
    assert ov[0, 0].tolist() == [200, 200, 200] and ov[0, 1].tolist() == [164, 100, 100]


def test_picture_legend_names_the_class_colours():
    """A grid with a legend band: one swatch per class drawn, in that class's VOC colour, under the rows."""
    names = ["background", "ball", "box", "ring"]
    legend = viz.class_legend(names, [0, 2, 255, 1, 2])
    assert legend == [("ball", (128, 0, 0)), ("box", (0, 128, 0))]  # background/ignore: the image shows through
    assert viz.class_legend(names, [0, 255]) == [("no foreground class (image shows through)", None)]
    cell = 40
    grid = viz.picture_grid([[np.full((10, 30, 3), 90, np.uint8), None]], ["a", "b"], cell=cell, legend=legend)
    assert grid.size == viz.grid_size(1, 2, cell, legend=2) and grid.size[1] > viz.grid_size(1, 2, cell)[1]
    top = viz.GRID_HEADER + cell + 2 * viz.GRID_PAD + 2  # first legend line, below the last row
    px = np.asarray(grid)
    assert px[top + 6, viz.GRID_PAD + 6].tolist() == [128, 0, 0]  # swatch 1
    assert px[top + viz.LEGEND_LINE + 6, viz.GRID_PAD + 6].tolist() == [0, 128, 0]  # narrow grid: next line
    wide = np.asarray(viz.picture_grid([[None] * 4], list("abcd"), cell=80, legend=legend))
    assert wide.shape[0] == viz.grid_size(1, 4, 80, legend=2)[1]
    assert wide[top + 40 + 6, viz.GRID_PAD + viz.LEGEND_ENTRY + 6].tolist() == [0, 128, 0]  # side by side
    # an all-background prediction is the image itself, not a black square
    img = np.full((4, 4, 3), 150, np.uint8)
    assert np.array_equal(viz.overlay(img, np.zeros((4, 4), np.uint8), 0.6), img)
