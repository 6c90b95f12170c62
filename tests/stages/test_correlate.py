import io
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from diclip import storage
from diclip.data.map_shards import CorrelationStore, batch_maps
from diclip.method.acr import refine_correlation
from diclip.method.resample import Geometry
from diclip.models.attention_capture import DiffusionAttention
from diclip.models.diffusion_maps import noise_seed
from diclip.models.diffusion import build_diffusion_from_config
from diclip.viz import colorize, grid_size
from ray_jobs.stages import correlate, synthesize
from ray_jobs.runtime.shards import list_shards
from tests.helpers import committed_ids, tiny_spec

pytestmark = pytest.mark.timeout(300)


def _prepare(root, *overrides, endpoint_url=None):
    spec = tiny_spec(root, *overrides, endpoint_url=endpoint_url)
    synthesize.run(spec)
    return spec


def test_correlate_two_actors_and_roundtrip_local(ray_session, tmp_path):
    """Whole images with the aspect kept (``whole_image: aspect``; the square default is tested against
    online maps in test_crop_bank)."""
    spec = _prepare(str(tmp_path / "run"), "correlate.whole_image=aspect", "correlate.resources.concurrency=2")
    out = correlate.run(spec)
    assert out["images"] == 10 and out["failed"] == 0
    manifest = storage.read_manifest(spec.correlate.output)
    assert manifest.num_items == 10 and manifest.extra["rar_codec"] == "qk_fp16"
    assert sum(s.rows for s in manifest.shards) == 10 and len(manifest.shards) >= 2  # several actor batches
    # A record expands to exactly what the model computes for that image.
    store = CorrelationStore(spec.correlate.output)
    rec = store.get(["synth_train_00000"])[0]
    assert rec.grid == (4, 5) and rec.rar_grid == (8, 10) and rec.src_size == (64, 80)
    from diclip.data import get_class_set, open_dataset

    ds = open_dataset(spec.data.root, "train", get_class_set("synthetic"))
    img = torch.from_numpy(ds.load("synth_train_00000").image.copy()).permute(2, 0, 1)[None].float() / 255
    diff = DiffusionAttention(build_diffusion_from_config(spec.model.diffusion), spec.model.diffusion)
    cap = diff(img, [noise_seed("synth_train_00000", spec.model.diffusion.seed)])
    want_vce = refine_correlation(cap.vce, size=cap.clip_grid)
    vce, rar = batch_maps([rec], None, None, None)
    # (batched vs single-image CPU kernels differ in the last bits, then fp16 storage)
    torch.testing.assert_close(vce, want_vce.float(), rtol=2e-3, atol=2e-5)
    want_rar = cap.rar_dense().mean(1)
    torch.testing.assert_close(rar, want_rar, rtol=2e-3, atol=2e-5)
    # identity geometry through the training reader returns the stored map exactly
    vce_id, _ = batch_maps([rec], [Geometry.identity((64, 80))], (4, 5), (8, 10))
    assert torch.equal(vce_id, vce)
    # preview: 4 rows of image | clusters | VCE | RAR; the clusters column shows the stored ids
    png = storage.read_bytes(storage.join(spec.correlate.output, "preview.png"))
    with Image.open(io.BytesIO(png)) as pic:
        assert pic.size == grid_size(4, 4, correlate.PREVIEW_CELL)
    cols = correlate.preview_columns(ds.load("synth_train_00000").image, rec)
    assert [c.shape for c in cols] == [(64, 80, 3)] * 4
    ids = rec.vce_ids.reshape(4, 5)
    assert np.array_equal(cols[1][::16, ::16], colorize(ids % 20 + 1))
    # resume and the training index read one commit index, not the shards
    from diclip.storage.commit_index import CommitIndex

    idx = CommitIndex.load(spec.correlate.output, correlate.INDEX_COLUMNS)
    assert len(idx) == 10 and idx.reads == 3 and manifest.extra["commit_index"] == "index.parquet"
    assert store.locate("synth_train_00000") == (idx.shard_uri("synth_train_00000"), idx.entries["synth_train_00000"][1])
    # re-running a complete stage does nothing
    again = correlate.run(spec)
    assert again["extracted_now"] == 0 and again["images"] == 10


def test_centre_row_picks_the_centre_token_and_scales_to_unit_range():
    grid = (3, 4)
    maps = torch.eye(12) * 0.5 + 0.1
    row = correlate.centre_row(maps, grid)
    want = np.zeros(grid, dtype=np.float32)
    want[1, 2] = 1.0  # token (h // 2) * w + w // 2 = 6
    assert np.allclose(row, want)


def test_correlate_roundtrip_s3_and_failures(ray_session, s3_bucket, s3_server, capsys):
    import re

    from diclip.cli import main

    spec = _prepare(f"{s3_bucket}/run", endpoint_url=s3_server)
    bad = storage.join(spec.data.root, "JPEGImages", "synth_val_00001.jpg")
    storage.write_bytes(bad, b"this is not a jpeg")
    # 1 of 10 is more than the default 5%: failures recorded, no manifest, the reason in one line, and the
    # command exits non-zero (through the CLI, which joins this test's Ray session)
    argv = ["correlate", "configs/tiny.yaml", f"output_uri={spec.output_uri}", f"storage.endpoint_url={s3_server}",
            "ray.progress_bars=false", "synthesize.num_train=6", "synthesize.num_val=4",
            "synthesize.image_size=[64,80]", "correlate.max_side=80", "correlate.resources.batch_size=3"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(argv) == 2
    finally:  # the CLI routes Ctrl-C/SIGTERM to its driver handler: give pytest its own back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"error: correlate: 1 of 10 items failed .* top reasons: 1x cannot decode image <item>.*",
                        err[-1])
    assert not any("Traceback" in line for line in err)
    assert not storage.is_complete(spec.correlate.output) and len(storage.read_failures(spec.correlate.output)) == 1
    spec = tiny_spec(spec.output_uri, "correlate.max_failed_fraction=0.2", endpoint_url=s3_server)
    out = correlate.run(spec)
    assert out["extracted_now"] == 0  # the 9 good maps were committed by the first run
    assert out["images"] == 9 and out["failed"] == 1
    failures = storage.read_failures(spec.correlate.output)
    assert failures[0][0] == "synth_val_00001" and "synth_val_00001" in failures[0][1]
    store = CorrelationStore(spec.correlate.output)
    assert "synth_val_00001" not in store and len(store.index) == 9
    rec = store.get(["synth_val_00000"])[0]
    vce, rar = batch_maps([rec], None, None, None)
    assert vce.shape == (1, 16, 16) and torch.isfinite(rar).all()  # the 64 px crop square: 4x4 tokens


def test_maps_of_a_failed_run_are_not_mixed_into_a_run_with_other_settings(ray_session, tmp_path):
    """The settings are recorded before any map is extracted: a failed (or interrupted) run leaves maps
    but no manifest, and a re-run with other settings must recompute them, not keep them."""
    from diclip.errors import StageFailed
    from ray_jobs.stages import evaluate, train
    from ray_jobs.runtime.lineage import changed_keys
    from ray_jobs.planning import plan_details, stale_settings

    small = ["synthesize.num_train=2", "synthesize.num_val=1"]
    spec = _prepare(str(tmp_path / "run"), *small)
    storage.write_bytes(storage.join(spec.data.root, "JPEGImages", "synth_val_00000.jpg"), b"not a jpeg")
    with pytest.raises(StageFailed):
        correlate.run(spec)
    assert len(list_shards(spec.correlate.output)) >= 1 and not storage.is_complete(spec.correlate.output)
    changed = tiny_spec(spec.output_uri, *small, "method.corr_threshold=0.5", "correlate.max_failed_fraction=0.5")
    assert correlate.stale(changed) == ["corr_threshold"]
    out = correlate.run(changed)
    assert out["extracted_now"] == 2 and out["images"] == 2 and correlate.is_complete(changed)
    assert not correlate.is_complete(spec)
    # the dataset is part of the identity: the same ids drawn again with another seed are other images
    redrawn = tiny_spec(spec.output_uri, *small, "synthesize.seed=3", "method.corr_threshold=0.5",
                        "correlate.max_failed_fraction=0.5")
    # before it is drawn, validate lists the maps stale because the stage they read will change
    assert correlate.is_complete(redrawn) and correlate.stale(redrawn) == []
    status = {name: (done, upstream) for name, done, _, upstream in plan_details(redrawn)}
    assert status["synthesize"] == (False, []) and status["correlate"] == (False, ["synthesize"])
    assert stale_settings(redrawn, "correlate") == ["synthesize output will change"]
    trained_with, evaluated_with = train.run_settings(changed), evaluate.run_key(changed, "weights", 64)
    synthesize.run(redrawn)
    assert not correlate.is_complete(redrawn) and correlate.stale(redrawn) == ["data.synthetic.seed"]
    # recomputed maps keep their shard names (ids): what reads them sees the settings they were made with
    assert correlate.run(redrawn)["extracted_now"] == 3  # the redrawn image decodes again
    assert "inputs.correlation.settings_hash" in changed_keys(trained_with, train.run_settings(redrawn))
    assert {"correlation_maps.settings_hash", "data.synthetic.seed"} <= set(
        changed_keys(evaluated_with, evaluate.run_key(redrawn, "weights", 64)))


def test_the_diffusion_input_recipe_is_part_of_every_diffusion_output(tmp_path, monkeypatch):
    """Maps, masks and cache features (and online train / evaluate runs) depend on how images become the
    diffusion input: rows made from another input (the earlier exact ``2x - 1`` floats) are stale."""
    import diclip.method.diffusion_input as recipe
    from ray_jobs.stages import cache, evaluate, mask, train
    from ray_jobs.runtime.lineage import changed_keys

    spec = tiny_spec(str(tmp_path / "run"), "train.mode=online", "evaluate.maps=online")

    def made_with():
        return {"correlate": correlate.settings(spec), "mask": mask.settings(spec), "cache": cache.settings(spec),
                "train": train.run_settings(spec), "evaluate": evaluate.run_key(spec, "weights", 64)}

    before = made_with()
    assert before["correlate"]["diffusion_input"]["recipe"] == recipe.DIFFUSION_INPUT
    monkeypatch.setattr(recipe, "DIFFUSION_INPUT", "another-input")
    after = made_with()
    for stage in before:
        assert any("diffusion_input.recipe" in k for k in changed_keys(before[stage], after[stage])), stage
