"""``diclip import-release``: the reference's released checkpoint + KV cache become an export and a cache.

Files are built with the reference's key names and shapes (tests/release/reference_files.py, from its
model classes; random values), saved with ``torch.save`` as the reference does, and imported through the
real CLI. The imported model's segmentation logits are compared with an independent restatement of the
reference's ``eval_seg`` inference on the same state dict (tests/release/oracle.py); full-size ViT-B/16
key names and shapes are checked on the meta device."""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch

from diclip import cli, storage
from diclip.config import load_spec
from tests.helpers import REPO
from tests.release import oracle
from tests.release.reference_files import (
    VIT_B16, meta_checkpoint, reference_cache, reference_checkpoint, reference_shapes,
)

TINY = str(REPO / "configs" / "tiny.yaml")
QUICK_GELU = "model.clip.quick_gelu=true"
"""The reference's CLIP blocks run QuickGELU (OpenAI's weights): a spec that imports its files says so."""
CLASSES = 5  # the tiny spec's synthetic class list
TINY_SIZES = dict(width=64, layers=4, patch=16, embed=64, text_width=64, text_layers=2, vocab=49408, context=77,
                  grid=4, num_classes=CLASSES, adapter=64, embedding=32, decoder_layers=1)
"""configs/tiny.yaml: diclip-tiny CLIP (4 blocks, width 64, 4 heads), adapter 64, segmenter 32 wide, 1 decoder
layer of 4 heads, crop 64 (the positional table a train-mode reference saves is 4x4)."""


@pytest.fixture(scope="module")
def tiny_clip():
    from diclip.models.clip import build_clip

    return build_clip(load_spec(TINY, [QUICK_GELU]).model.clip)


def write_release(where, clip, *, prefix: str = "", diffusion: bool = False, sizes: dict | None = None,
                  cache_classes: int = CLASSES):
    """(checkpoint path, cache path, state dict) as the reference saves them."""
    state = reference_checkpoint(clip.model, reference_shapes(**{**TINY_SIZES, **(sizes or {})}), grid=4)
    if diffusion:  # a DiCLIP_model variant whose diffusion extractor registers its weights
        state["diff_attn_extractor.model.unet.conv_in.weight"] = torch.randn(8, 4, 3, 3)
        state["diff_attn_extractor.model.vae.decoder.conv_out.bias"] = torch.randn(3)
    saved = {prefix + k: v for k, v in state.items()}
    where.mkdir(parents=True, exist_ok=True)
    ckpt, cache = where / "model_sota.pth", where / "diffusion_v2_1_kv_cache_with_clustering.pth"
    torch.save(saved, ckpt)
    torch.save(reference_cache(TINY_SIZES["embed"], cache_classes), cache)
    return str(ckpt), str(cache), saved


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["import-release", TINY, *argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


def import_args(tmp_path, ckpt: str | None, cache: str | None, out: str) -> list[str]:
    args = [f"output_uri={tmp_path / 'run'}", QUICK_GELU, "--out", out]
    return args + (["--checkpoint", ckpt] if ckpt else []) + (["--cache", cache] if cache else [])


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, diffusion", [("", False), ("module.", True)], ids=["plain", "module-prefix+sd"])
def test_imported_logits_equal_the_reference_eval_seg(tmp_path, tiny_clip, capsys, prefix, diffusion) -> None:
    from diclip.inference import load_exported_model

    ckpt, cache, state = write_release(tmp_path / "release", tiny_clip, prefix=prefix, diffusion=diffusion)
    out = str(tmp_path / "export")
    rc, printed, err = run(capsys, *import_args(tmp_path, ckpt, cache, out))
    assert rc == 0, err
    lines = printed.splitlines()
    assert any(line.startswith("skipped:") and "text-tower" in line for line in lines)
    assert any(line.startswith("skipped: 1 resized positional embedding") for line in lines)
    assert any(line.startswith("checked: ") and "encoder.visual tensors equal model.clip" in line for line in lines)
    assert ("removed the 'module.' prefix" in printed) == bool(prefix)
    assert ("skipped: 2 diffusion tensors" in printed) == diffusion
    assert not any(line.startswith(("unmapped", "missing")) for line in lines), printed

    model, spec, card = load_exported_model(out)
    assert card["mode"] == "reference-release" and card["imported_from"]["checkpoint"] == ckpt
    mean = torch.tensor(spec.model.clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.model.clip.std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 64, 64), (1, 3, 80, 48)]:
        x = torch.rand(shape, generator=g)
        with torch.no_grad():
            got = model(x, seg_only=True).seg_logits
        want = oracle.eval_seg(state, tiny_clip.model.visual.positional_embedding, (x - mean) / std,
                               vision_heads=4, decoder_heads=spec.model.decoder_heads)
        assert got.shape == want.shape == (shape[0], CLASSES, shape[2] // 16, shape[3] // 16)
        diff = float((got - want).abs().max())
        print(f"{shape}: max |imported - reference eval_seg| = {diff:.3g} (logits up to {float(want.abs().max()):.3g})")
        assert diff <= 1e-5
    nudged = dict(state)  # the comparison is not blind: one decoder weight moved by 1e-3 shows
    key = prefix + "decoder.transformer.resblocks.0.mlp.c_fc.weight"
    nudged[key] = state[key] + 1e-3
    moved = oracle.eval_seg(nudged, tiny_clip.model.visual.positional_embedding, (x - mean) / std, vision_heads=4,
                            decoder_heads=spec.model.decoder_heads)
    assert float((moved - want).abs().max()) > 1e-4


@pytest.mark.parametrize("config, classes, adapter, entries", [("voc.yaml", 21, 312, 225), ("coco.yaml", 81, 512, 425)])
def test_full_size_reference_keys_map_onto_the_project_model(config, classes, adapter, entries) -> None:
    """ViT-B/16 checkpoints of both datasets (shapes only, meta device): every tensor lands somewhere."""
    from diclip.release.mapping import check_heads, check_visual, clip_shape, head_shapes, sort_keys

    spec = load_spec(str(REPO / "configs" / config))
    shapes = reference_shapes(**VIT_B16, num_classes=classes, adapter=adapter)
    keys = sort_keys(meta_checkpoint(shapes))
    clip = clip_shape(spec)
    target = head_shapes(spec, classes, clip, entries)
    notes: list[str] = []
    check_visual(keys, clip, spec.model.clip.surgery_blocks, notes.append)
    check_heads(keys, target, spec, classes, clip, notes.append)
    assert notes == [] and keys.unmapped == []
    assert {k: tuple(v.shape) for k, v in keys.heads.items()} == {k: tuple(v) for k, v in target.items()}
    assert {f"visual.{k}": tuple(v.shape) for k, v in keys.visual.items()} == {
        k: tuple(v) for k, v in clip.visual.items() if k != "visual.positional_embedding"}
    text = sum(1 for k in shapes if k.startswith("encoder.") and not k.startswith("encoder.visual."))
    assert keys.skipped == {"text": text, "position": 1, "alias": 4} and keys.surgery == [9, 10, 11]
    assert len(target) == 4 + 12 * 4 + 2 + 3 * 12 + 2  # adapter, fusion MLPs + fuse conv, 3 decoder blocks, head


def test_a_coco_checkpoint_for_the_voc_class_list_is_one_line() -> None:
    from diclip.errors import ModelError
    from diclip.release.mapping import check_heads, clip_shape, head_shapes, sort_keys

    spec = load_spec(str(REPO / "configs" / "voc.yaml"))
    keys = sort_keys(meta_checkpoint(reference_shapes(**VIT_B16, num_classes=81, adapter=512)))
    clip = clip_shape(spec)
    with pytest.raises(ModelError, match=r"predicts 81 classes but the spec's class list has 21"):
        check_heads(keys, head_shapes(spec, 21, clip, 225), spec, 21, clip, print)


# ------------------------------------------------------------------------------------------------
class Payload:
    """Any object: a weights-only load must refuse it."""


class Exploit:
    """What an untrusted pickle does: run a command when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["checkpoint", "cache"])
def test_a_pickle_with_an_object_is_refused_in_one_line(tmp_path, tiny_clip, capsys, which) -> None:
    ckpt, cache, state = write_release(tmp_path / "release", tiny_clip)
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pth"
    if which == "checkpoint":
        torch.save({**state, "extra": Payload(), "run": Exploit(str(marker))}, bad)
        ckpt = str(bad)
    else:
        torch.save([Exploit(str(marker)), torch.zeros(3, 5)], bad)
        cache = str(bad)
    out = tmp_path / "export"
    rc, _, err = run(capsys, *import_args(tmp_path, ckpt, cache, str(out)))
    assert rc == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {bad}: refused, it holds more than tensors in plain containers (it names "), line
    assert "weights_only=True" in line
    assert not marker.exists() and not out.exists()


def _broken_values(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    values[4] = 0.5
    return values


def _poison(key: str, value: float):
    """An edit that puts ``value`` (NaN, inf) into one element of the checkpoint tensor ``key``."""
    def edit(state: dict) -> None:
        t = state[key].clone()
        t.view(-1)[0] = value
        state[key] = t
    return edit


BAD_INPUTS = {
    # name: (what to do to the release files, a piece of the one error line)
    "cache-classes": ({"cache_classes": CLASSES + 1}, "the cache has 6 classes but the spec's class list has 5"),
    "checkpoint-classes": ({"sizes": {"num_classes": CLASSES + 1}}, "the checkpoint predicts 6 classes but"),
    "adapter-size": ({"sizes": {"adapter": 80}},
                     "has 80 hidden units but model.adapter_size=64; set model.adapter_size=80"),
    "decoder-layers": ({"sizes": {"decoder_layers": 2}}, "has 2 transformer layers but model.decoder_layers=1"),
    "wrong-shape": ({"edit": lambda s: s.__setitem__("decoder_fts_fuse.linear_fuse.weight", torch.zeros(32, 64, 1, 1))},
                    "decoder_fts_fuse.linear_fuse.weight has shape [32, 64, 1, 1] but the model built from the spec "
                    "needs [32, 128, 1, 1]"),
    "nan-head": ({"edit": _poison("decoder.linear_pred.weight", float("nan"))},
                 "decoder.linear_pred.weight holds non-finite values (NaN/inf)"),
    "inf-adapter": ({"edit": _poison("dynamic_adapter.fc1.bias", float("-inf"))},
                    "dynamic_adapter.fc1.bias holds non-finite values (NaN/inf)"),
    "nan-clip": ({"edit": _poison("encoder.visual.conv1.weight", float("nan"))},
                 "encoder.visual.conv1.weight holds non-finite values (NaN/inf)"),
    "missing-key": ({"edit": lambda s: s.pop("decoder.linear_pred.bias")}, "lacks 1 adapter/segmenter tensors"),
    "not-a-state-dict": ({"checkpoint": [torch.zeros(3), torch.zeros(2)]}, "not a state dict (torch.load gives list"),
    "cache-is-a-state-dict": ({"cache": {"keys": torch.zeros(3, 64)}}, "not a KV cache"),
    "not-one-hot": ({"cache_edit": _broken_values}, "value row 4 is not one-hot"),
    "cache-too-big": ({"cache": reference_cache(64, CLASSES, per_class=20)}, "the cache has 83 entries but "
                      "model.adapter_size=64"),
    "not-torch": ({"raw": b"not a checkpoint"}, "not a torch.save file"),
    "checkpoint-without-cache": ({"no_cache": True}, "import-release needs --cache"),
}


@pytest.fixture(scope="module")
def good_export(tmp_path_factory, tiny_clip):
    """A successful import the failing ones must leave as it was."""
    tmp = tmp_path_factory.mktemp("good")
    ckpt, cache, _ = write_release(tmp / "release", tiny_clip)
    out = tmp / "export"
    assert cli.main(["import-release", TINY, f"output_uri={tmp / 'run'}", QUICK_GELU, "--checkpoint", ckpt,
                     "--cache", cache, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_loses_nothing(tmp_path, tiny_clip, good_export, capsys, case) -> None:
    from diclip.inference import load_exported_model

    capsys.readouterr()
    change, expected = BAD_INPUTS[case]
    ckpt, cache, state = write_release(tmp_path / "release", tiny_clip, sizes=change.get("sizes"),
                                       cache_classes=change.get("cache_classes", CLASSES))
    if "edit" in change:
        change["edit"](state)
        torch.save(state, ckpt)
    if "checkpoint" in change:
        torch.save(change["checkpoint"], ckpt)
    if "raw" in change:
        open(ckpt, "wb").write(change["raw"])
    if "cache" in change:
        torch.save(change["cache"], cache)
    if "cache_edit" in change:
        keys, values = torch.load(cache, weights_only=True)
        torch.save([keys, change["cache_edit"](values)], cache)
    out = tmp_path / "export"
    shutil.copytree(good_export, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, printed, err = run(capsys, *import_args(tmp_path, ckpt, None if change.get("no_cache") else cache, str(out)))
    assert rc == 2, printed
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    if case == "missing-key":
        assert "missing: segmenter.decoder.head.bias [5]" in printed.splitlines()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    load_exported_model(str(out))


def test_other_clip_weights_are_refused_unless_told(tmp_path, tiny_clip, capsys) -> None:
    ckpt, cache, _ = write_release(tmp_path / "release", tiny_clip)
    out = str(tmp_path / "export")
    rc, _, err = run(capsys, *import_args(tmp_path, ckpt, cache, out), "model.clip.seed=1")
    assert rc == 2 and "the checkpoint's CLIP differs from model.clip diclip-tiny/random-seed1" in err
    assert not os.path.exists(out)
    rc, printed, err = run(capsys, *import_args(tmp_path, ckpt, cache, out), "model.clip.seed=1", "--no-clip-check")
    assert rc == 0, err
    assert "not checked: encoder.visual against model.clip's weights (--no-clip-check)" in printed


def test_the_imported_export_and_cache_load_like_trained_ones(storage_root, tmp_path, tiny_clip, capsys,
                                                              monkeypatch) -> None:
    """evaluate's and infer's loading, the segmentation entry they share, and train's start from the cache."""
    from diclip.data import get_class_set
    from diclip.inference import load_exported_model, read_export, segment, segmenter_forward
    from ray_jobs.stages import train
    from ray_jobs.runtime.lineage import fingerprint
    from ray_jobs.planning import plan

    files = write_release(tmp_path / "release", tiny_clip)[:2]
    ckpt, cache = (f"{storage_root}/release/{os.path.basename(f)}" for f in files)  # read from the store too
    for local, uri in zip(files, (ckpt, cache)):
        storage.write_bytes(uri, open(local, "rb").read())
    out = f"{storage_root}/imported"
    reads: list[str] = []
    read_bytes = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a, **k: reads.append(uri) or read_bytes(uri, *a, **k))
    rc, printed, err = run(capsys, *import_args(tmp_path, ckpt, cache, out))
    assert rc == 0, err
    assert reads.count(ckpt) <= 1 and reads.count(cache) <= 1, reads  # hashed from the bytes loaded, not re-read
    provenance = storage.read_json(f"{out}/card.json")["imported_from"]
    assert provenance["checkpoint_sha256"] == hashlib.sha256(open(files[0], "rb").read()).hexdigest()
    assert provenance["cache_sha256"] == hashlib.sha256(open(files[1], "rb").read()).hexdigest()
    assert printed.splitlines()[-2:] == [
        f"export: {out} (evaluate.checkpoint={out} infer.checkpoint={out})",
        f"cache: {out}/cache (train.cache={out}/cache; leave generate, mask and cache out of pipeline.stages)"]
    read_export(out, get_class_set("synthetic"))  # evaluate's driver check
    model, _, _ = load_exported_model(out, dataset="synthetic")  # the evaluate/infer actors' loading
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    masks = segment(segmenter_forward(model), images, 64, [1.0, 1.5], flip=True, work_ratio=0.4)
    assert [m.shape for m in masks] == [(70, 90), (64, 64)] and all(m.max() < CLASSES for m in masks)

    spec = load_spec(TINY, [f"output_uri={tmp_path / 'run'}", QUICK_GELU, f"train.cache={out}/cache",
                            "pipeline.stages=[correlate,train,evaluate]", f"evaluate.checkpoint={out}",
                            "train.mode=online"])
    train.preflight(spec)  # the train stage's own check of its cache (online: no correlate output needed)
    assert fingerprint(f"{out}/cache")["num_items"] == 3 + 2 * (CLASSES - 1)
    assert train.run_settings(spec)["inputs"]["cache"] is not None  # a re-import of another cache makes train stale
    assert [name for name, _, _ in plan(spec)] == ["correlate", "train", "evaluate"]


def test_a_cache_alone_imports_for_the_train_stage(tmp_path, tiny_clip, capsys) -> None:
    from diclip.models.kv_cache import load_cache

    _, cache, _ = write_release(tmp_path / "release", tiny_clip)
    out = str(tmp_path / "imported")
    rc, printed, err = run(capsys, *import_args(tmp_path, None, cache, out))
    assert rc == 0, err
    assert "export:" not in printed and not os.path.exists(os.path.join(out, "card.json"))
    kv = load_cache(storage.join(out, "cache"), 64, ["background", "ball", "box", "kite", "star"])
    assert kv.keys.dtype == torch.float32 and kv.card["imported_from"]["file"] == cache
    ref_keys, ref_values = torch.load(cache, weights_only=True)
    assert torch.equal(kv.keys, ref_keys.float()) and torch.equal(kv.values, ref_values)


def test_a_spec_whose_clip_runs_gelu_is_refused(tmp_path, tiny_clip, capsys) -> None:
    """The reference's CLIP blocks run QuickGELU; diclip-tiny's config (like a local file of OpenAI weights)
    builds GELU unless the spec says otherwise, which would silently change every feature."""
    ckpt, cache, _ = write_release(tmp_path / "release", tiny_clip)
    out = tmp_path / "export"
    rc = cli.main(["import-release", TINY, f"output_uri={tmp_path / 'run'}", "--checkpoint", ckpt, "--cache", cache,
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == ("error: model.clip diclip-tiny/random-seed0 would run GELU, but the reference's "
                                       "CLIP runs QuickGELU; set model.clip.quick_gelu=true (or use pretrained=openai)")
    assert not out.exists()
