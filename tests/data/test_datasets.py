"""Readers for hand-built VOC/COCO-layout datasets, label files and their error messages."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diclip.data import (
    COCO_CLASSES,
    VOC_CLASSES,
    ClassListMismatch,
    SegDataset,
    decode_image,
    decode_mask,
    get_class_set,
    load_cls_labels,
    open_dataset,
    save_cls_labels,
)
from diclip.data.classes import COCO, SYNTHETIC, VOC
from diclip.data.synthetic import voc_palette
from diclip.errors import DataError

VOC_CS = get_class_set("voc")


# -- helpers --------------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The message of a raised DataError, asserting it is a single line."""
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def write_jpeg(path: Path, h: int = 20, w: int = 30, colour=(200, 40, 40), mode: str = "RGB") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = colour
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="JPEG", quality=95)
    return arr


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette(voc_palette())
    img.save(path, format="PNG")


def multi_hot(ids, k: int) -> np.ndarray:
    v = np.zeros(k - 1, np.float32)
    for c in ids:
        v[c - 1] = 1
    return v


def make_voc(root: Path, items: dict[str, list[int]], *, h=20, w=30, mask_dir="SegmentationClass",
             labels: bool = True, split="train", masks: bool = True, k: int = 21) -> Path:
    """VOC-layout dir; each item's mask has its classes as horizontal bands plus a 255 border."""
    for image_id, classes in items.items():
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", h, w)
        if masks:
            mask = np.zeros((h, w), np.uint8)
            for j, c in enumerate(classes):
                mask[2 + 4 * j: 5 + 4 * j, 3:20] = c
            mask[0, :] = 255
            write_mask(root / mask_dir / f"{image_id}.png", mask)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in items))
    if labels:
        # the way WSSS projects write it: np.save of a plain dict (a pickled 0-d object array)
        np.save(root / "cls_labels.npy", {i: multi_hot(c, k) for i, c in items.items()})
    return root


ITEMS = {"2007_000032": [1, 15], "2007_000039": [20], "2008_000002": [12, 15]}


# -- VOC layout -----------------------------------------------------------------------------------


def test_voc_layout_reads_images_masks_labels(tmp_path):
    make_voc(tmp_path, ITEMS)
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    assert ds.ids == list(ITEMS) and len(ds) == 3
    assert ds.mask_dir == str(tmp_path / "SegmentationClass")
    samples = list(ds)
    assert [s.id for s in samples] == list(ITEMS)
    for s in samples:
        assert s.image.shape == (20, 30, 3) and s.image.dtype == np.uint8
        assert abs(int(s.image[..., 0].mean()) - 200) < 6  # colour survived JPEG, RGB order kept
        assert s.label.dtype == np.float32 and s.label.shape == (20,)
        np.testing.assert_array_equal(s.label, multi_hot(ITEMS[s.id], 21))
        assert s.mask is not None and s.mask.dtype == np.uint8 and s.mask.shape == (20, 30)
        assert set(np.unique(s.mask)) == {0, 255, *ITEMS[s.id]}
    assert ds.read_image_bytes("2007_000032")[:2] == b"\xff\xd8"
    assert ds.image_uri("2007_000032").endswith("JPEGImages/2007_000032.jpg")


def test_segmentation_class_aug_preferred_and_explicit_mask_dir(tmp_path):
    make_voc(tmp_path, ITEMS, mask_dir="SegmentationClassAug")
    make_voc(tmp_path, {k: [3] for k in ITEMS}, mask_dir="SegmentationClass", labels=False)
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    assert ds.mask_uri("2007_000039").endswith("SegmentationClassAug/2007_000039.png")
    assert 20 in ds.load("2007_000039").mask
    ds2 = SegDataset(str(tmp_path), "train", VOC_CS, mask_dir=str(tmp_path / "SegmentationClass"))
    assert 3 in ds2.load("2007_000039").mask
    with pytest.raises(DataError) as e:
        SegDataset(str(tmp_path), "train", VOC_CS, mask_dir=str(tmp_path / "nope"))
    assert "nope" in one_line(e)


def test_no_masks_gives_none_unless_required(tmp_path):
    make_voc(tmp_path, ITEMS, masks=False)
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    assert ds.mask_uri("2007_000032") is None
    assert all(s.mask is None for s in ds)
    with pytest.raises(DataError) as e:
        SegDataset(str(tmp_path), "train", VOC_CS, require_masks=True)
    assert "SegmentationClass" in one_line(e)


def test_train_aug_list_lines_and_list_dir(tmp_path):
    make_voc(tmp_path, ITEMS)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_aug.txt").write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n\n"
        "JPEGImages/2008_000002.jpg SegmentationClassAug/2008_000002.png\n"
        "2007_000039\n"
    )
    ds = SegDataset(str(tmp_path), "train_aug", VOC_CS, list_dir=str(lists))
    assert ds.ids == ["2007_000032", "2008_000002", "2007_000039"]
    assert [s.id for s in ds] == ds.ids


def test_labels_file_found_in_list_dir_and_json(tmp_path):
    make_voc(tmp_path, ITEMS, labels=False, masks=False)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("\n".join(ITEMS))
    np.save(lists / "cls_labels.npy", {i: multi_hot(c, 21) for i, c in ITEMS.items()})
    ds = SegDataset(str(tmp_path), "train", VOC_CS, list_dir=str(lists))
    assert ds.labels_uri == str(lists / "cls_labels.npy")
    np.testing.assert_array_equal(ds.load("2007_000039").label, multi_hot([20], 21))

    (tmp_path / "labels.json").write_text('{"2007_000032": [1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1], '
                                          '"2007_000039": [0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1], '
                                          '"2008_000002": [0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0,0]}')
    ds = SegDataset(str(tmp_path), "train", VOC_CS, labels_file="labels.json")
    np.testing.assert_array_equal(ds.load("2007_000032").label, multi_hot([1, 20], 21))


def test_labels_derived_from_masks_when_labels_file_missing(tmp_path):
    make_voc(tmp_path, ITEMS, labels=False)
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    assert ds.labels_derived and ds.labels_uri is None
    for s in ds:
        np.testing.assert_array_equal(s.label, multi_hot(ITEMS[s.id], 21))


def test_no_labels_and_no_masks_is_an_error(tmp_path):
    make_voc(tmp_path, ITEMS, labels=False, masks=False)
    with pytest.raises(DataError) as e:
        SegDataset(str(tmp_path), "train", VOC_CS)
    assert "cls_labels.npy" in one_line(e)


def test_construction_is_lazy_for_large_lists(tmp_path):
    """10k ids whose images do not exist: construction must not touch them."""
    ids = [f"img_{i:05d}" for i in range(10_000)]
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(ids) + "\n")
    np.save(tmp_path / "cls_labels.npy", {ids[0]: multi_hot([1], 21)})
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    assert len(ds) == 10_000
    with pytest.raises(DataError) as e:
        ds.load(ids[5])
    assert "img_00005.jpg" in one_line(e)


def test_missing_split_list_names_expected_path(tmp_path):
    make_voc(tmp_path, ITEMS)
    with pytest.raises(DataError) as e:
        SegDataset(str(tmp_path), "val", VOC_CS)
    assert str(tmp_path / "ImageSets" / "Segmentation" / "val.txt") in one_line(e)


# -- COCO layout ----------------------------------------------------------------------------------


def test_coco_layout_strips_prefix_for_masks(tmp_path):
    items = {"train": {"COCO_train2014_000000000009": [1, 47], "COCO_train2014_000000000025": [25]},
             "val": {"COCO_val2014_000000000042": [18]}}
    for folder, its in items.items():
        for image_id, classes in its.items():
            write_jpeg(tmp_path / "JPEGImages" / folder / f"{image_id}.jpg", 24, 16)
            mask = np.zeros((24, 16), np.uint8)
            for j, c in enumerate(classes):
                mask[3 * j: 3 * j + 2] = c
            write_mask(tmp_path / "SegmentationClass" / folder / f"{image_id.rsplit('_', 1)[1]}.png", mask)
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(items["train"]))
    (lists / "val.txt").write_text("\n".join(items["val"]))
    all_items = {**items["train"], **items["val"]}
    np.save(tmp_path / "cls_labels.npy", {i: multi_hot(c, 81) for i, c in all_items.items()})

    ds = open_dataset(str(tmp_path), "train", "coco")
    assert ds.layout == "coco" and ds.class_set.num_classes == 81
    assert ds.mask_uri("COCO_train2014_000000000009").endswith("SegmentationClass/train/000000000009.png")
    for s in ds:
        assert s.image.shape == (24, 16, 3)
        np.testing.assert_array_equal(s.label, multi_hot(all_items[s.id], 81))
        assert set(np.unique(s.mask)) == {0, *all_items[s.id]}
    val = open_dataset(str(tmp_path), "val", COCO)
    assert [s.id for s in val] == ["COCO_val2014_000000000042"]
    assert val.image_uri("COCO_val2014_000000000042").endswith("JPEGImages/val/COCO_val2014_000000000042.jpg")


# -- per-item errors and skip_bad -----------------------------------------------------------------


def test_corrupt_jpeg_names_file_and_skip_bad_skips(tmp_path):
    make_voc(tmp_path, ITEMS)
    bad = tmp_path / "JPEGImages" / "2007_000039.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(500))
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    with pytest.raises(DataError) as e:
        list(ds)
    assert str(bad) in one_line(e)
    ds = SegDataset(str(tmp_path), "train", VOC_CS, skip_bad=True)
    assert [s.id for s in ds] == ["2007_000032", "2008_000002"]


def test_missing_image_and_missing_label(tmp_path):
    make_voc(tmp_path, ITEMS)
    os.remove(tmp_path / "JPEGImages" / "2007_000032.jpg")
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    with pytest.raises(DataError) as e:
        ds.load("2007_000032")
    msg = one_line(e)
    assert "missing" in msg and str(tmp_path / "JPEGImages" / "2007_000032.jpg") in msg

    labels = {i: multi_hot(c, 21) for i, c in ITEMS.items() if i != "2008_000002"}
    np.save(tmp_path / "cls_labels.npy", labels)
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    with pytest.raises(DataError) as e:
        ds.load("2008_000002")
    assert "no image-level label for '2008_000002'" in one_line(e)
    assert [s.id for s in SegDataset(str(tmp_path), "train", VOC_CS, skip_bad=True)] == ["2007_000039"]


def test_wrong_class_list_is_reported_and_not_skippable(tmp_path):
    make_voc(tmp_path, ITEMS)  # 20-dim VOC labels
    for cs in ("coco", "synthetic"):
        with pytest.raises(DataError) as e:
            SegDataset(str(tmp_path), "train", cs, skip_bad=True)
        msg = one_line(e)
        assert "class list" in msg and "20-dim" in msg and "wrong class list?" in msg


def test_mask_id_out_of_range(tmp_path):
    make_voc(tmp_path, ITEMS)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 5:9] = 30
    mask[0] = 255
    path = tmp_path / "SegmentationClass" / "2007_000039.png"
    write_mask(path, mask)
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    with pytest.raises(DataError) as e:
        ds.load("2007_000039")
    msg = one_line(e)
    assert str(path) in msg and "class id 30" in msg and "wrong class list" in msg
    assert isinstance(e.value, ClassListMismatch)
    with pytest.raises(ClassListMismatch):  # a class-list problem is never skipped
        list(SegDataset(str(tmp_path), "train", VOC_CS, skip_bad=True))


def test_image_mask_size_mismatch(tmp_path):
    make_voc(tmp_path, ITEMS)
    write_mask(tmp_path / "SegmentationClass" / "2007_000032.png", np.zeros((21, 30), np.uint8))
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    with pytest.raises(DataError) as e:
        ds.load("2007_000032")
    assert "30x20" in one_line(e) and "30x21" in str(e.value)
    assert [s.id for s in SegDataset(str(tmp_path), "train", VOC_CS, skip_bad=True)] == ["2007_000039", "2008_000002"]


# -- decoding -------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGBA", "PNG"), ("L", "PNG"), ("L", "JPEG"), ("P", "PNG"), ("LA", "PNG"), ("I;16", "PNG"),
     ("1", "PNG"), ("CMYK", "JPEG")],
)
def test_decode_image_any_mode_to_rgb(mode, fmt):
    base = np.zeros((7, 11, 3), np.uint8)
    base[:, :5] = (250, 250, 250)
    img = Image.fromarray(base)
    if mode == "I;16":  # a real 16-bit image: full range is 0..65535
        img = Image.fromarray(base[..., 0].astype(np.uint16) * 257)
    else:
        img = img.convert("L").convert(mode) if mode == "1" else img.convert(mode)
    assert img.mode == mode
    out = decode_image(_encode(img, fmt), f"x.{fmt.lower()}")
    assert out.shape == (7, 11, 3) and out.dtype == np.uint8
    assert out[:, :5].mean() > 200 and out[:, 6:].mean() < 40


def test_grayscale_jpeg_through_dataset(tmp_path):
    make_voc(tmp_path, ITEMS)
    write_jpeg(tmp_path / "JPEGImages" / "2007_000032.jpg", mode="L")
    # a PNG with alpha stored under .jpg: decoding goes by content, not by name
    Image.new("RGBA", (30, 20), (10, 200, 10, 128)).save(tmp_path / "JPEGImages" / "2007_000039.jpg", format="PNG")
    ds = SegDataset(str(tmp_path), "train", VOC_CS)
    gray = ds.load("2007_000032").image
    assert gray.shape == (20, 30, 3) and (gray[..., 0] == gray[..., 1]).all()
    rgba = ds.load("2007_000039").image
    assert rgba.shape == (20, 30, 3) and tuple(rgba[0, 0]) == (10, 200, 10)


def test_decode_image_corrupt_names_file():
    with pytest.raises(DataError) as e:
        decode_image(b"not an image at all", "s3://b/JPEGImages/x.jpg")
    assert "s3://b/JPEGImages/x.jpg" in one_line(e)


def test_decode_mask_keeps_palette_indices_and_rejects_rgb():
    mask = np.array([[0, 1, 15], [255, 20, 0]], np.uint8)
    img = Image.fromarray(mask)
    img.putpalette(voc_palette())
    assert img.mode == "P"
    np.testing.assert_array_equal(decode_mask(_encode(img, "PNG"), "m.png"), mask)
    np.testing.assert_array_equal(decode_mask(_encode(Image.fromarray(mask), "PNG"), "m.png"), mask)
    with pytest.raises(DataError) as e:
        decode_mask(_encode(img.convert("RGB"), "PNG"), "colour.png")
    assert "colour.png" in one_line(e) and "RGB" in str(e.value)


# -- label files ----------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    holder = np.empty((), dtype=object)
    holder[()] = {"2007_000032": _Evil(marker)}
    evil = tmp_path / "cls_labels.npy"
    np.save(evil, holder, allow_pickle=True)
    with pytest.raises(DataError) as e:
        load_cls_labels(str(evil))
    msg = one_line(e)
    assert msg.startswith(f"refusing to unpickle {os.system.__module__}.system from {evil}")
    assert not marker.exists()
    # and through a dataset, at construction
    make_voc(tmp_path, ITEMS, labels=False)
    with pytest.raises(DataError, match="refusing to unpickle"):
        SegDataset(str(tmp_path), "train", VOC_CS)
    assert not marker.exists()


def test_restricted_unpickler_reads_numpy1_protocol2_pickles(tmp_path):
    """Old label files name numpy.core.* and (protocol <3) _codecs.encode."""
    import pickle

    labels = {"a": np.array([0, 1, 0], np.float32), "b": [np.float32(1), np.float32(0), np.float32(1)]}
    payload = pickle.dumps(labels, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in payload and b"_codecs" in payload
    buf = io.BytesIO()
    np.save(buf, np.empty((), object), allow_pickle=True)  # take a valid object-array header
    raw = buf.getvalue()
    header_len = 10 + int.from_bytes(raw[8:10], "little")
    (tmp_path / "old.npy").write_bytes(raw[:header_len] + payload)
    out = load_cls_labels(str(tmp_path / "old.npy"))
    np.testing.assert_array_equal(out["a"], [0, 1, 0])
    np.testing.assert_array_equal(out["b"], [1, 0, 1])
    assert out["b"].dtype == np.float32


@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_save_load_labels_round_trip(tmp_path, suffix):
    labels = {"x": [0, 1, 1, 0], "y": np.array([1, 0, 0, 0], np.float32)}
    uri = str(tmp_path / f"labels{suffix}")
    save_cls_labels(uri, labels)
    out = load_cls_labels(uri)
    assert list(out) == ["x", "y"]
    np.testing.assert_array_equal(out["y"], [1, 0, 0, 0])
    assert out["x"].dtype == np.float32
    if suffix == ".npy":  # readable the way WSSS projects read it
        assert set(np.load(uri, allow_pickle=True).item()) == {"x", "y"}


def test_labels_file_garbage_is_a_data_error(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError) as e:
        load_cls_labels(str(tmp_path / "bad.npy"))
    assert "bad.npy" in one_line(e)
    np.save(tmp_path / "list.npy", np.empty((), object), allow_pickle=True)
    with pytest.raises(DataError, match="expected a dict"):
        load_cls_labels(str(tmp_path / "list.npy"))


# -- class sets -----------------------------------------------------------------------------------


def test_class_sets():
    assert VOC_CLASSES[0] == COCO_CLASSES[0] == "background"
    assert (VOC.num_classes, COCO.num_classes, SYNTHETIC.num_classes) == (21, 81, 5)
    assert VOC_CLASSES[15] == "person" and COCO_CLASSES[1] == "person" and COCO_CLASSES[80] == "toothbrush"
    assert COCO.prompt_names[31] == "sknowboard" and COCO_CLASSES[32] == "snowboard"
    assert "keyboard" not in COCO.background_words and len(COCO.background_words) == 23
    for cs in (VOC, COCO, SYNTHETIC):
        assert len(cs.prompt_names) == len(cs.generation_words) == cs.num_classes - 1
    assert get_class_set("VOC") is VOC and get_class_set(COCO) is COCO
    with pytest.raises(DataError) as e:
        get_class_set("cityscapes")
    assert "coco, synthetic, toy, voc" in one_line(e)


def _exif_jpeg(path: Path, arr: np.ndarray, orientation: int) -> None:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=100, subsampling=0, exif=exif.tobytes())


def test_exif_rotated_photos_are_read_as_displayed_and_masks_follow(tmp_path):
    """A phone photo stored 30x50 with orientation 6 (rotate 90) is shown 50x30: every stage reads it that
    way; a mask drawn on the stored pixels (30x50) is rotated with it, one drawn as displayed kept."""
    from PIL import ImageOps

    root = make_voc(tmp_path / "voc", {"raw": [1], "shown": [1]}, h=30, w=50)
    stored = np.zeros((30, 50, 3), np.uint8)
    stored[:, :10] = (230, 20, 20)  # a red strip along the stored image's left edge
    for name in ("raw", "shown"):
        _exif_jpeg(root / "JPEGImages" / f"{name}.jpg", stored, 6)
    mask_raw = np.zeros((30, 50), np.uint8)
    mask_raw[:, :10] = 1  # drawn on the stored pixels
    write_mask(root / "SegmentationClass" / "raw.png", mask_raw)
    displayed = np.asarray(ImageOps.exif_transpose(Image.open(root / "JPEGImages" / "raw.jpg")))
    mask_shown = (displayed[..., 0] > 128).astype(np.uint8)  # drawn on the displayed image
    write_mask(root / "SegmentationClass" / "shown.png", mask_shown)
    ds = open_dataset(str(root), "train", VOC)
    for name in ("raw", "shown"):
        s = ds.load(name)
        assert s.image.shape == (50, 30, 3)  # displayed orientation
        assert s.mask.shape == (50, 30)
        red = s.image[..., 0] > 128
        assert (s.mask[red] == 1).mean() > 0.95 and (s.mask[~red] == 0).mean() > 0.95  # aligned
    data = (root / "JPEGImages" / "raw.jpg").read_bytes()
    assert decode_image(data, "raw.jpg").shape == (50, 30, 3)


def test_cached_split_reads_a_split_once_per_run_and_again_for_the_next(tmp_path):
    """Input-task processes outlive a run: within one run a split is opened once, a new run sees new data."""
    from diclip.config import load_spec
    from diclip.data import cached_split
    from diclip.data.synthetic import generate_synthetic

    root = tmp_path / "data"
    generate_synthetic(str(root), num_train=3, num_val=2, image_size=(32, 32), show_progress=False)
    spec = load_spec("configs/tiny.yaml", [f"output_uri={tmp_path}", f"data.root={root}"])
    first = cached_split(spec.data, "train", scope="run-1")
    assert cached_split(spec.data, "train", scope="run-1") is first and len(first.ids) == 3
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(first.ids[:2]) + "\n")
    assert cached_split(spec.data, "train", scope="run-1").ids == first.ids  # same run: not read again
    assert cached_split(spec.data, "train", scope="run-2").ids == first.ids[:2]  # next run: the new list


def test_generation_words_are_the_references():
    """The words the reference generated its KV-cache images with (its per-class folder names): VOC from
    maintain_kv_cache's generator, COCO from datasets/dif_coco/main.py (whose last word is misspelt
    'toothbrus' there; the intended word is used)."""
    from diclip.data.classes import COCO, VOC

    voc = ("plane bicycle bird boat bottle buses car cat chair cow table dog horse motorbike people plant sheep "
           "sofa train monitor").split()
    coco = ("person|bicycle|car|motorbike|aeroplane|bus|train|truck|boat|traffic light|fire hydrant|stop sign|"
            "parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|backpack|umbrella|handbag|"
            "tie|suitcase|frisbee|skis|snowboard|sports ball|kite|baseball bat|baseball glove|skateboard|surfboard|"
            "tennis racket|bottle|wine glass|cup|fork|knife|spoon|bowl|banana|apple|sandwich|orange|broccoli|carrot|"
            "hot dog|pizza|donut|cake|chair|sofa|pottedplant|bed|diningtable|toilet|tvmonitor|laptop|mouse|remote|"
            "keyboard|cell phone|microwave|oven|toaster|sink|refrigerator|book|clock|vase|scissors|teddy bear|"
            "hair drier|toothbrush").split("|")
    assert list(VOC.generation_words) == voc and list(COCO.generation_words) == coco
