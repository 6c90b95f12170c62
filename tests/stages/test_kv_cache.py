"""The KV-cache chain: ``generate`` -> ``mask`` -> ``cache`` on local Ray (2 actors). (Through S3 (SeaweedFS) it runs
in ``test_pipeline.test_own_class_set_end_to_end_into_s3``, which runs the whole pipeline into a bucket.)

Stage runs dominate the time (actor start-up), so the generated outputs are shared per module:
``gen_a`` / ``gen_b`` are two runs of the same spec into different dirs.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from diclip import storage
from diclip.data import get_class_set
from diclip.data.datasets import decode_image, decode_mask
from diclip.errors import ConfigError, ModelError
from diclip.models.attention_capture import DiffusionAttention
from diclip.models.cam_masks import to_square_batch
from diclip.models.diffusion_maps import noise_seed, vce_compact
from diclip.models.diffusion import build_diffusion_from_config
from diclip.models.kv_cache import CACHE_FILE, load_cache
from diclip.viz import grid_size
from ray_jobs.stages import cache, generate, mask
from ray_jobs.runtime.shards import list_shards, read_stage_table
from tests.helpers import tiny_spec

pytestmark = pytest.mark.timeout(600)

# 4 synthetic classes x 2 images, 2 actors x batch 4 (-> 2 shards per stage), tiny generation settings
BASE = (
    "generate.images_per_class=2",
    "generate.num_inference_steps=2",
    "generate.size=64",
    "generate.save_size=96",
    "generate.resources.concurrency=2",
    "generate.resources.num_cpus=0.5",
    "generate.resources.batch_size=4",
    "mask.resources.concurrency=2",
    "mask.resources.num_cpus=0.5",
    "mask.resources.batch_size=4",
    "cache.resources.concurrency=2",
    "cache.resources.num_cpus=0.5",
    "cache.resources.batch_size=4",
)
CLASSES = get_class_set("synthetic").classes


def images_by_id(spec) -> dict[str, bytes]:
    t = read_stage_table(spec.generate.output, ["item_id", "image"])
    return dict(zip(t.column("item_id").to_pylist(), t.column("image").to_pylist()))


@pytest.fixture(scope="module")
def gen_a(ray_session, tmp_path_factory):
    spec = tiny_spec(str(tmp_path_factory.mktemp("a") / "run"), *BASE)
    return spec, generate.run(spec)


@pytest.fixture(scope="module")
def gen_b(ray_session, tmp_path_factory):
    spec = tiny_spec(str(tmp_path_factory.mktemp("b") / "run"), *BASE)
    return spec, generate.run(spec)


@pytest.fixture(scope="module")
def masked_a(gen_a):
    spec, _ = gen_a
    return spec, mask.run(spec)


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
def test_generate_is_deterministic_per_seed(gen_a, gen_b):
    (spec_a, out_a), (spec_b, out_b) = gen_a, gen_b
    assert out_a["generated_now"] == 8 and out_a["images"] == 8 and out_a["failed"] == 0
    assert out_b["generated_now"] == 8
    a, b = images_by_id(spec_a), images_by_id(spec_b)
    assert sorted(a) == [f"{c}/{i:05d}" for c in CLASSES[1:] for i in range(2)]
    assert a == b  # same PNG bytes for every item across two runs into different dirs
    assert len(set(a.values())) == 8  # ... and every item its own image
    rows = read_stage_table(spec_a.generate.output).to_pylist()
    for r in rows:
        cls, idx = r["item_id"].split("/")
        assert r["class_name"] == cls and CLASSES[r["class_id"]] == cls
        assert r["seed"] == generate.image_seed(cls, int(idx), spec_a.generate.seed)
        assert (r["width"], r["height"]) == (96, 96)
        assert Image.open(io.BytesIO(r["image"])).size == (96, 96)  # save_size after generation at 64
        word = get_class_set("synthetic").generation_words[r["class_id"] - 1]
        assert r["prompt"] == spec_a.generate.prompt_template.replace("{}", word)
    manifest = storage.read_manifest(spec_a.generate.output)
    assert len(manifest.shards) == 2 and manifest.extra["per_class"] == {c: 2 for c in CLASSES[1:]}
    assert generate.is_complete(spec_a)


def test_generate_grows_incrementally(gen_b):
    spec, _ = gen_b
    before = images_by_id(spec)
    old_shards = {s.path for s in storage.read_manifest(spec.generate.output).shards}
    grown = tiny_spec(spec.output_uri, *BASE, "generate.images_per_class=3")
    assert generate.is_complete(spec) and not generate.is_complete(grown)
    out = generate.run(grown)
    assert out["generated_now"] == 4 and out["images"] == 12
    assert out["generated_per_class"] == {c: 1 for c in CLASSES[1:]}
    after = images_by_id(grown)
    assert {k: after[k] for k in before} == before  # the first two per class untouched
    new_shards = [s for s in storage.read_manifest(spec.generate.output).shards if s.path not in old_shards]
    new_ids = sorted(i for s in new_shards for i in storage.read_parquet(
        storage.join(spec.generate.output, s.path), ["item_id"]).column("item_id").to_pylist())
    assert new_ids == [f"{c}/00002" for c in CLASSES[1:]]  # only the missing index was generated
    assert generate.is_complete(grown)
    # other image settings in the same output: stale, and run starts over (never mixes old and new images)
    changed = tiny_spec(spec.output_uri, *BASE, "generate.images_per_class=3", "generate.guidance_scale=7")
    assert generate.stale(changed) == ["guidance_scale"] and not generate.is_complete(changed)
    out = generate.run(changed)
    assert out["generated_now"] == 12 and out["images"] == 12 and generate.is_complete(changed)
    redone = images_by_id(changed)
    assert sorted(redone) == sorted(after) and all(redone[k] != after[k] for k in after)
    assert len(storage.read_manifest(spec.generate.output).shards) == len(list_shards(spec.generate.output))
    generate.run(grown)  # and back: the original settings give the original images again (seeded per item)
    assert images_by_id(grown) == after


def test_special_prompts_and_unknown_classes(tmp_path):
    spec = tiny_spec(str(tmp_path), "data.dataset=voc")
    prompts = {it["class_name"]: it["prompt"] for it in generate.list_items(spec)}
    assert "entire person, centered" in prompts["person"] and "entire bus, centered" in prompts["bus"]
    assert prompts["cat"].count("cat") == 3 and "entire cat with natural colors" in prompts["cat"]
    with pytest.raises(ConfigError, match="'unicorn' is not a foreground class"):
        generate.list_items(tiny_spec(str(tmp_path), "generate.classes=[ball,unicorn]"))


# ----------------------------------------------------------------------------------------------
# mask
# ----------------------------------------------------------------------------------------------
def test_mask_filters_and_records_failures(gen_b):
    spec0, _ = gen_b
    # corrupt one generated image in place (the manifest still lists it)
    gm = storage.read_manifest(spec0.generate.output)
    shard = storage.join(spec0.generate.output, gm.shards[0].path)
    table = storage.read_parquet(shard)
    bad = table.column("item_id")[0].as_py()
    images = table.column("image").to_pylist()
    images[0] = b"not a png"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    storage.write_parquet(shard, table, row_group_size=1)

    spec = tiny_spec(spec0.output_uri, *BASE, "mask.min_foreground=0.99", "mask.max_foreground=1.0",
                     "mask.max_failed_fraction=0.5")  # one corrupt image of a handful is more than the default 5%
    n = gm.num_items
    out = mask.run(spec)
    assert out["failed"] == 1 and out["images"] == n - 1
    failures = storage.read_failures(spec.mask.output)
    assert failures[0][0] == bad and "cannot decode image" in failures[0][1] and bad in failures[0][1]
    rows = read_stage_table(spec.mask.output).to_pylist()
    assert bad not in {r["item_id"] for r in rows}
    for r in rows:
        frac = r["foreground_fraction"]
        assert r["kept"] == (frac >= 0.99)
        assert bool(r["reason"]) == (not r["kept"])
        if not r["kept"]:
            assert r["reason"].startswith("empty" if frac == 0 else "too_small")
        m = decode_mask(r["mask"], r["item_id"])
        assert m.shape == (96, 96) and set(np.unique(m)) <= {0, r["class_id"]}
        assert abs((m > 0).mean() - frac) < 1e-6
    extra = storage.read_manifest(spec.mask.output).extra
    assert extra["filtered"] == sum(not r["kept"] for r in rows) >= 1
    assert extra["kept"] + extra["filtered"] == n - 1
    assert sum(v["images"] for v in extra["per_class"].values()) == n - 1
    assert sum(extra["filtered_by_reason"].values()) == extra["filtered"]
    assert set(extra["filtered_by_reason"]) <= {"empty", "too_small"}
    assert mask.is_complete(spec)
    # the preview shows up to 2 masks per class, filtered ones first, and skips the failed image
    chosen = mask.preview_rows(spec.mask.output, 2)
    per_class = {}
    for r in rows:
        per_class.setdefault(r["class_id"], []).append(r)
    assert len(chosen) == sum(min(2, len(v)) for v in per_class.values())
    for c, members in per_class.items():
        picked = [r for r in chosen if r["class_id"] == c]
        assert [r["kept"] for r in picked] == sorted(r["kept"] for r in members)[: len(picked)]
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(spec.mask.output, "preview.png")))) as img:
        assert img.size == grid_size(len(chosen), 3, mask.PREVIEW_CELL)


def test_mask_keeps_within_thresholds(masked_a):
    spec, out = masked_a
    assert out["failed"] == 0 and out["kept"] >= 1 and out["kept"] + out["filtered"] == out["images"]
    for r in read_stage_table(spec.mask.output, ["foreground_fraction", "kept"]).to_pylist():
        assert r["kept"] == (0 < r["foreground_fraction"] and 0.01 <= r["foreground_fraction"] <= 0.95)


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------
def test_cache_shapes_determinism_and_adapter(masked_a):
    spec, _ = masked_a
    out = cache.run(spec)
    assert out["failed"] == 0 and out["embed_dim"] == 64
    # expected size from the feature shards: min(k, keys) per class plus min(k_bg, background keys)
    feats = read_stage_table(spec.cache.output).to_pylist()
    kept = read_stage_table(spec.mask.output, ["item_id", "kept"]).to_pylist()
    assert sorted(r["item_id"] for r in feats) == sorted(r["item_id"] for r in kept if r["kept"])
    fg = {c: sum(1 for r in feats if r["class_id"] == c and r["fg_key"] is not None) for c in range(1, 5)}
    n_bg = sum(1 for r in feats if r["bg_key"] is not None)
    k, k_bg = spec.cache.clusters_per_class, spec.cache.background_clusters
    want = [0] * min(k_bg, n_bg) + [c for c in range(1, 5) for _ in range(min(k, fg[c]))]

    kv = load_cache(spec.cache.output, 64, list(CLASSES))
    assert kv.keys.shape == (len(want), 64) and kv.keys.dtype == torch.float32
    assert kv.values.shape == (len(want), 5)
    assert torch.equal(kv.values, torch.nn.functional.one_hot(torch.tensor(want), 5).float())
    assert torch.isfinite(kv.keys).all()
    card = kv.card
    assert card["classes"] == list(CLASSES) and card["num_entries"] == len(want)
    assert card["counts"]["background"] == {"images": n_bg, "centroids": min(k_bg, n_bg)}
    assert card["sources"]["generate"]["uri"] == spec.generate.output and card["sources"]["mask"]["config_hash"]
    assert card["models"]["clip"] == "diclip-tiny/random-seed0" and card["models"]["generation"] == "tiny"
    manifest = storage.read_manifest(spec.cache.output)
    assert manifest.extra["keys_shape"] == [len(want), 64] and manifest.extra["values_shape"] == [len(want), 5]
    assert cache.is_complete(spec)

    # same seed, fresh output: identical cache
    other = tiny_spec(spec.output_uri, *BASE, f"cache.output={spec.output_uri}/cache2")
    assert not cache.is_complete(other)
    cache.run(other)
    kv2 = load_cache(other.cache.output, 64, list(CLASSES))
    assert torch.equal(kv.keys, kv2.keys) and torch.equal(kv.values, kv2.values)
    # a re-run after losing the cache file re-uses the feature shards and rebuilds the same cache
    storage.delete(storage.join(other.cache.output, CACHE_FILE))
    assert not cache.is_complete(other)
    again = cache.run(other)
    assert again["featurised_now"] == 0
    assert torch.equal(load_cache(other.cache.output, 64, list(CLASSES)).keys, kv.keys)

    # the cache loads into the KV adapter of the model
    from diclip.models.clip import build_clip
    from diclip.models.diclip_model import DiCLIP

    clip = build_clip(spec.model.clip)
    model = DiCLIP(clip, get_class_set("synthetic"), kv, spec.model, spec.method)
    assert model.cache_keys.shape == kv.keys.shape
    # the keys live in the model's CAM feature space: DiCLIP.forward with the image's VCE map
    row = next(r for r in feats if r["fg_key"] is not None)
    img_row = next(r for r in read_stage_table(spec.generate.output).to_pylist() if r["item_id"] == row["item_id"])
    mask_row = next(r for r in read_stage_table(spec.mask.output).to_pylist() if r["item_id"] == row["item_id"])
    x = to_square_batch([decode_image(img_row["image"], "x")], spec.cache.image_size)
    diff = DiffusionAttention(build_diffusion_from_config(spec.model.diffusion), spec.model.diffusion)
    corr = vce_compact(diff(x, [noise_seed(row["item_id"], spec.model.diffusion.seed)]), spec.method,
                       spec.model.diffusion).expand()
    f = model.eval()(x, corr).features[0, 1:]
    m = torch.tensor(decode_mask(mask_row["mask"], "m"), dtype=torch.float32)[None, None]
    inside = torch.nn.functional.interpolate(m, size=(4, 4), mode="nearest").flatten() > 0
    torch.testing.assert_close(f[inside].mean(0), torch.tensor(row["fg_key"]), rtol=1e-4, atol=1e-5)
    # ... and a mismatched cache is rejected with one line
    with pytest.raises(ModelError) as e:
        load_cache(spec.cache.output, 512, list(CLASSES))
    assert "dim 64" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError) as e:
        load_cache(spec.cache.output, 64, list(get_class_set("voc").classes))
    assert "classes" in str(e.value) and "\n" not in str(e.value)

    # a re-run of the complete chain does no work
    assert generate.run(spec)["generated_now"] == 0 and mask.run(spec)["masked_now"] == 0
    # other images under the same ids: the masks and the cache made from the old ones are stale and redone
    changed = tiny_spec(spec.output_uri, *BASE, "generate.guidance_scale=9")
    assert generate.run(changed)["generated_now"] == 8
    assert not mask.is_complete(changed) and mask.stale(changed) == ["generate output changed"]
    assert not cache.is_complete(changed) and cache.stale(changed) == ["generate output changed"]
    assert mask.run(changed)["masked_now"] == 8
    assert cache.stale(changed) == ["generate output changed", "mask output changed"]
    kept = sum(r["kept"] for r in read_stage_table(changed.mask.output, ["kept"]).to_pylist())
    assert cache.run(changed)["featurised_now"] == kept  # every kept mask again, none reused
    assert all(mod.is_complete(changed) for mod in (generate, mask, cache))
