"""The per-crop map bank (correlate.crops_per_image): exact maps per crop, growth, and training from it."""
import numpy as np
import pytest
import torch

from diclip import storage
from diclip.data import get_class_set, open_dataset
from diclip.data.map_shards import CorrelationStore, batch_maps
from diclip.data.crop_bank import bank_crop, bank_geometry, crop_item_id, geometry_from_array, split_crop_id
from diclip.data.transforms import apply_geometry
from diclip.models.attention_capture import DiffusionAttention
from diclip.models.diffusion_maps import noise_seed, vce_compact
from diclip.models.diffusion import build_diffusion_from_config
from diclip.train.data import build_items, load_rows, rank_table
from ray_jobs.stages import correlate, synthesize
from tests.helpers import tiny_spec

pytestmark = pytest.mark.timeout(600)
BANK = ["correlate.crops_per_image=2", "data.crop_size=48"]


def test_crop_ids_geometry_and_position_schedule():
    assert crop_item_id("a_1", 3) == "a_1@crop3" and split_crop_id("a_1@crop3") == ("a_1", 3)
    assert split_crop_id("a_1") == ("a_1", None)
    g1 = bank_geometry("img", 1, (64, 80), 48, (0.75, 1.5), True, seed=0)
    assert g1 == bank_geometry("img", 1, (64, 80), 48, (0.75, 1.5), True, seed=0)  # pure function
    assert g1 != bank_geometry("img", 2, (64, 80), 48, (0.75, 1.5), True, seed=0)
    assert g1.out_size == (48, 48) and g1.src_size == (64, 80)
    # each image visits each of its K crops once per K epochs, whatever K's shift for the image
    n, k = 5, 3
    pos = np.arange(n * k * 2)
    ids = [f"i{p % n}" for p in pos]
    crops = bank_crop(pos, n, ids, k, seed=0)
    for i in range(n):
        seen = crops[[p for p in pos if p % n == i]]
        assert sorted(seen[:k]) == list(range(k)) and list(seen[k:]) == list(seen[:k])


TRAIN = ["train.max_iters=4", "train.eval_every=2", "train.log_every=1", "train.val_limit=2", "train.warmup_iters=1",
         "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def bank(ray_session, tmp_path_factory):
    """One synthetic dataset with a K=2 bank, shared by the tests below (the last one grows it)."""
    spec = tiny_spec(str(tmp_path_factory.mktemp("bank") / "run"), *BANK, *TRAIN)
    synthesize.run(spec)
    out = correlate.run(spec)
    assert out["images"] == 10 + 6 * 2 and out["failed"] == 0  # whole images + 2 crops per train image
    return spec


def test_bank_maps_are_the_online_maps_of_the_crop(bank):
    spec = bank
    store = CorrelationStore(spec.correlate.output)
    ds = open_dataset(spec.data.root, "train", get_class_set("synthetic"))
    item = ds.ids[2]
    rec = store.get([crop_item_id(item, 1)])[0]
    assert rec.crop == 1 and rec.grid == (3, 3) and rec.rar_grid == (6, 6)
    # what online mode computes on that crop, with the same noise and model
    d = spec.data
    geom = bank_geometry(item, 1, ds.load(item).image.shape[:2], d.crop_size, tuple(d.rescale_range), d.flip,
                         spec.correlate.crop_seed)
    crop = torch.from_numpy(apply_geometry(ds.load(item).image, geom)).permute(2, 0, 1)[None].float() / 255
    diff = DiffusionAttention(build_diffusion_from_config(spec.model.diffusion), spec.model.diffusion)
    cap = diff(crop, [noise_seed(crop_item_id(item, 1), spec.model.diffusion.seed)])
    comp = vce_compact(cap, spec.method, spec.model.diffusion)
    assert np.array_equal(rec.vce_ids, comp.ids[0].numpy())  # the same ACR clusters
    vce, rar = batch_maps([rec], None, None, None)
    torch.testing.assert_close(vce, comp.expand().float(), rtol=2e-3, atol=1e-6)  # fp16 rows in storage
    torch.testing.assert_close(rar, cap.rar_dense().mean(1), rtol=2e-3, atol=1e-6)
    # the bank's own geometry is stored; training rebuilds the crop's pixels from it
    geoms = store.bank_geometries()
    assert len(geoms) == 12 and geometry_from_array(geoms[crop_item_id(item, 1)]) == geom


def test_eval_maps_are_the_online_maps_of_the_square(bank):
    """Validation and CAM evaluation read whole-image maps extracted at the crop square, as the reference
    runs SD on its 320x320 resize: stored maps equal online maps of that square, no resampling."""
    from diclip.inference import MapSource, resize_square

    spec = bank
    ds = open_dataset(spec.data.root, "val", get_class_set("synthetic"))
    items = ds.ids[:2]
    images = [ds.load(i).image for i in items]
    x = torch.stack([resize_square(im, spec.data.crop_size) for im in images])
    sizes = [im.shape[:2] for im in images]
    assert sizes[0] != (48, 48)  # the aspect is not kept
    stored = MapSource("stored", spec, 16, correlation_uri=spec.correlate.output)
    assert stored.store.get([items[0]])[0].grid == (3, 3)
    corr_s, rar_s, grid_s = stored(items, x, sizes)
    corr_o, rar_o, grid_o = MapSource("online", spec, 16)(items, x, sizes)
    assert grid_s == grid_o == (6, 6)
    torch.testing.assert_close(corr_s, corr_o, rtol=2e-3, atol=1e-6)  # fp16 rows in storage
    torch.testing.assert_close(rar_s, rar_o, rtol=2e-3, atol=1e-6)


def test_training_index_and_loader_use_the_bank(bank):
    spec = bank
    items = build_items(spec, "train", spec.correlate.output)
    assert items.num_rows == 12 and items.schema.metadata[b"crops"] == b"2"
    table = rank_table(items, 0, 1, 6, 0, 2, spec.train.seed)  # positions 0..11 = two epochs of 6 images
    ids, rows = table.column("item_id").to_pylist(), table.column("corr_row").to_pylist()
    shards = table.column("corr_shard").to_pylist()
    store = CorrelationStore(spec.correlate.output)
    for i, sh, r, pos in zip(ids, shards, rows, table.column("pos").to_pylist()):
        k = int(bank_crop(np.array([pos]), 6, [i], 2, spec.train.seed)[0])
        assert store.locate(crop_item_id(i, k)) == (sh, r)
    by_image = {}
    for i, pos in zip(ids, table.column("pos").to_pylist()):
        by_image.setdefault(i, []).append(int(bank_crop(np.array([pos]), 6, [i], 2, spec.train.seed)[0]))
    assert all(sorted(v) == [0, 1] for v in by_image.values())  # both crops over the two epochs
    d = spec.data
    loaded = load_rows(table.slice(0, 3).to_pydict(), crop=d.crop_size, scale_range=tuple(d.rescale_range),
                       flip=d.flip, seed=spec.train.seed, with_maps=True)
    ds = open_dataset(spec.data.root, "train", get_class_set("synthetic"))
    for j in range(3):
        rec_crop = split_crop_id(store.get([crop_item_id(ids[j], 0)])[0].item_id)
        assert rec_crop[0] == ids[j]
        geom = table.column("bank_geom").to_pylist()[j]
        want = apply_geometry(ds.load(ids[j]).image, geometry_from_array(geom))
        assert np.array_equal(loaded["image"][j], want)  # the bank crop's exact pixels
        assert list(loaded["geom"][j][-2:]) == [48, 48] and loaded["geom"][j][4] == 0  # maps used as stored


def test_growing_k_extracts_only_the_new_crops(bank):
    spec = bank
    store = CorrelationStore(spec.correlate.output)
    item = open_dataset(spec.data.root, "train", get_class_set("synthetic")).ids[2]
    rec = store.get([crop_item_id(item, 1)])[0]
    # growing the bank to K=3 extracts crop 2 of every train image, nothing else
    before = {s.path for s in storage.read_manifest(spec.correlate.output).shards}
    grown = tiny_spec(spec.output_uri, "correlate.crops_per_image=3", "data.crop_size=48")
    assert correlate.is_complete(spec) and not correlate.is_complete(grown)
    again = correlate.run(grown)
    assert again["extracted_now"] == 6 and again["images"] == 10 + 6 * 3
    manifest = storage.read_manifest(spec.correlate.output)
    assert before <= {s.path for s in manifest.shards}  # earlier shards kept as they were
    new = CorrelationStore(spec.correlate.output).get([crop_item_id(item, 1)])[0]
    assert np.array_equal(new.vce_rows, rec.vce_rows)
    # growing it back down is a no-op: K=2 is covered by the K=3 bank; a new training seed reuses the bank
    assert correlate.is_complete(spec)
    assert correlate.is_complete(tiny_spec(spec.output_uri, *BANK, "train.seed=7"))
    assert not correlate.is_complete(tiny_spec(spec.output_uri, *BANK, "correlate.crop_seed=7"))
    # training follows the spec's K: the K=2 spec trains on crops 0..1 of the K=3 bank; K=4 is refused
    items = build_items(spec, "train", spec.correlate.output)
    assert items.num_rows == 12 and items.schema.metadata[b"crops"] == b"2"
    from diclip.errors import DataError

    with pytest.raises(DataError, match="crops_per_image=4 but the maps .* hold 3 crops"):
        build_items(tiny_spec(spec.output_uri, "correlate.crops_per_image=4", "data.crop_size=48"), "train",
                    spec.correlate.output)
