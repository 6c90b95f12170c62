"""The synthetic dataset generator: ground truth consistency, determinism, idempotency, S3."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diclip.data import SegDataset, generate_synthetic, get_class_set, load_cls_labels
from diclip.data.synthetic import STYLES, voc_palette

CS = get_class_set("synthetic")
PARAMS = dict(num_train=8, num_val=4, image_size=(64, 96), seed=3, max_objects=3, show_progress=False)
BASES = np.array([STYLES[c][1] for c in range(1, CS.num_classes)], dtype=np.float64)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synth"))
    summary = generate_synthetic(root, **PARAMS)
    assert summary["skipped"] is False and summary["num_train"] == 8 and summary["num_val"] == 4
    return root


def _files(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _nearest_base(pixels: np.ndarray) -> np.ndarray:
    """Class id (1..4) whose base colour is nearest to each RGB pixel."""
    d = ((pixels[:, None, :].astype(np.float64) - BASES[None]) ** 2).sum(-1)
    return d.argmin(1) + 1


@pytest.mark.parametrize("split,n", [("train", 8), ("val", 4)])
def test_generated_samples_are_consistent(synth_root, split, n):
    ds = SegDataset(synth_root, split, CS)
    samples = list(ds)
    assert len(samples) == n
    seen = set()
    for s in samples:
        assert s.image.shape == (64, 96, 3) and s.image.dtype == np.uint8
        assert s.mask is not None and s.mask.shape == (64, 96) and s.mask.dtype == np.uint8
        present = {int(v) for v in np.unique(s.mask)}
        assert present <= {0, 1, 2, 3, 4} and present - {0}, s.id
        expected = np.zeros(4, np.float32)
        expected[[c - 1 for c in present if c]] = 1
        np.testing.assert_array_equal(s.label, expected)  # label == classes visible in the mask
        for c in present - {0}:
            pix = s.image[s.mask == c]
            assert _nearest_base(pix.mean(0, keepdims=True))[0] == c, (s.id, c)
            # hard edges + no chroma subsampling: (nearly) every object pixel is in its family
            assert (_nearest_base(pix) == c).mean() >= 0.98, (s.id, c)
        bg = s.image[s.mask == 0].astype(np.float64)
        assert (bg.max(1) - bg.min(1)).mean() < 60  # dull background, unlike the saturated objects
        seen |= present
    assert len(seen - {0}) >= 2  # more than one class shows up


def test_layout_and_summary(synth_root):
    root = Path(synth_root)
    train = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 8 and len(val) == 4 and not set(train) & set(val)
    png = Image.open(root / "SegmentationClass" / f"{train[0]}.png")
    assert png.mode == "P" and png.getpalette()[:9] == voc_palette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    jpg = Image.open(root / "JPEGImages" / f"{train[0]}.jpg")
    assert jpg.format == "JPEG" and jpg.size == (96, 64)
    labels = load_cls_labels(str(root / "cls_labels.npy"))
    assert set(labels) == set(train) | set(val)
    meta = json.loads((root / "synthetic.json").read_text())
    counts = np.sum([labels[i] for i in train + val], axis=0)
    assert meta["class_counts"] == {name: int(n) for name, n in zip(CS.foreground, counts)}
    assert meta["params"]["image_size"] == [64, 96] and meta["params"]["seed"] == 3


def test_deterministic_per_seed(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    small = dict(PARAMS, num_train=3, num_val=2)
    generate_synthetic(a, **small)
    generate_synthetic(b, **small)
    generate_synthetic(c, **dict(small, seed=4))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert set(fa) == set(fc)
    jpgs = [k for k in fa if k.endswith(".jpg")]
    assert jpgs and all(fa[k] != fc[k] for k in jpgs)


def test_idempotent_rerun_skips_and_param_change_regenerates(tmp_path):
    root = str(tmp_path / "s")
    small = dict(PARAMS, num_train=2, num_val=1)
    first = generate_synthetic(root, **small)
    mtimes = {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}
    again = generate_synthetic(root, **small)
    assert again["skipped"] is True and first["skipped"] is False
    assert {k: v for k, v in again.items() if k != "skipped"} == {k: v for k, v in first.items() if k != "skipped"}
    assert {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()} == mtimes
    changed = generate_synthetic(root, **dict(small, num_train=3))
    assert changed["skipped"] is False and len(SegDataset(root, "train", CS)) == 3


def test_square_int_size_and_single_object(tmp_path):
    generate_synthetic(str(tmp_path), num_train=2, num_val=1, image_size=32, max_objects=1, show_progress=False)
    for s in SegDataset(str(tmp_path), "val", "synthetic"):
        assert s.image.shape == (32, 32, 3) and s.label.sum() == 1


def test_s3_round_trip(s3_bucket):
    root = f"{s3_bucket}/synth"
    summary = generate_synthetic(root, num_train=4, num_val=2, image_size=48, seed=1, show_progress=False)
    assert summary["skipped"] is False
    assert generate_synthetic(root, num_train=4, num_val=2, image_size=48, seed=1, show_progress=False)["skipped"]
    for split, n in (("train", 4), ("val", 2)):
        ds = SegDataset(root, split, CS)
        assert ds.image_uri(ds.ids[0]).startswith(f"{s3_bucket}/synth/JPEGImages/")
        samples = list(ds)
        assert len(samples) == n
        for s in samples:
            assert s.image.shape == (48, 48, 3) and s.mask.shape == (48, 48)
            present = sorted(int(v) for v in np.unique(s.mask) if v)
            assert [i + 1 for i in np.flatnonzero(s.label)] == present


def test_the_stage_is_complete_only_for_the_params_it_was_drawn_with(tmp_path):
    """``synthesize`` used to count as complete whenever ``synthetic.json`` existed, so another seed or
    size was skipped and the old images were used under the new spec."""
    from ray_jobs.stages import synthesize
    from ray_jobs.planning import stale_settings
    from tests.helpers import tiny_spec

    small = ["synthesize.num_train=2", "synthesize.num_val=1", "synthesize.image_size=[32,32]"]
    spec = tiny_spec(str(tmp_path / "run"), *small)
    assert not synthesize.is_complete(spec) and synthesize.stale(spec) == []
    synthesize.run(spec)
    assert synthesize.is_complete(spec)
    changed = tiny_spec(str(tmp_path / "run"), *small, "synthesize.seed=5", "synthesize.num_train=3")
    assert not synthesize.is_complete(changed)
    assert stale_settings(changed, "synthesize") == ["synthesize.num_train", "synthesize.seed"]
    assert synthesize.run(changed)["skipped"] is False
    assert synthesize.is_complete(changed) and not synthesize.is_complete(spec)
