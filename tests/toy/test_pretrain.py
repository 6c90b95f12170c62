"""``diclip pretrain-toy``: both toy trainers run as children, resume, and package a release that the
pipeline's real loaders (open_clip, diffusers) load; and the shipped release is what the cards say."""
import json
import os

import pytest
import torch

from diclip.config import ClipConfig, DiffusionConfig
from diclip.models.clip import build_clip
from diclip.models.diffusion import build_diffusion, capture_timestep

pytestmark = pytest.mark.timeout(600)

SMALL_CLIP = ["--batch", "8", "--eval-every", "2", "--eval-count", "8", "--log-every", "1", "--ckpt-every", "1"]
SMALL_DIFF = ["--batch", "2", "--vae-batch", "2", "--eval-every", "2", "--eval-count", "2", "--log-every", "1",
              "--ckpt-every", "1"]


def test_pretrain_resumes_and_packages_a_loadable_release(tmp_path):
    from diclip.toy.pretrain import pretrain

    out = str(tmp_path / "toy")
    pretrain(out, progress=False, clip_args=["--steps", "2", *SMALL_CLIP],
             diffusion_args=["--vae-steps", "1", "--steps", "1", "--group-steps", "1", *SMALL_DIFF])
    # grow both runs by one step: each resumes from its checkpoint instead of starting over
    release = pretrain(out, progress=False, clip_args=["--steps", "3", *SMALL_CLIP],
                       diffusion_args=["--vae-steps", "1", "--steps", "2", "--group-steps", "1", *SMALL_DIFF])
    assert "phase 3 starts over" in open(os.path.join(out, "diffusion.log")).read()  # phase 2 grew under it
    release = pretrain(out, progress=False, only="diffusion",
                       diffusion_args=["--vae-steps", "1", "--steps", "2", "--group-steps", "2", *SMALL_DIFF])
    assert "resumed from" in open(os.path.join(out, "clip.log")).read()
    assert "resumed from" in open(os.path.join(out, "diffusion.log")).read()
    card = json.load(open(os.path.join(release, "clip_card.json")))
    assert card["steps"] == 3 and card["eval_history"] and "zeroshot_map" in card["eval_history"][-1]
    dcard = json.load(open(os.path.join(release, "diffusion", "card.json")))
    assert dcard["unet_steps"] == 2 and dcard["final_train_losses"]["step"] >= 2
    # phase 3 (the grouping objective) ran after phase 2, and resumed from its own checkpoint
    assert dcard["group_steps"] == 2 and dcard["final_group_losses"]["step"] == 1 + 2 + 2
    assert "resumed phase 3" in open(os.path.join(out, "diffusion.log")).read()
    clip = build_clip(ClipConfig(name="diclip-toy", pretrained=os.path.join(release, "clip.safetensors")))
    assert sorted(os.listdir(os.path.join(release, "diffusion", "tokenizer"))) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]  # the lean form, which the loader below reads
    pipe = build_diffusion(os.path.join(release, "diffusion"))
    assert clip.model.visual.patch_size in (8, (8, 8)) and pipe.vae_scale_factor == 2
    assert os.path.getsize(os.path.join(out, "clip", "curves.png")) > 0


def test_the_shipped_release_loads_through_the_spec_names():
    """``diclip:toy/...`` names resolve inside the installed package; the cards describe those files."""
    clip = build_clip(ClipConfig(name="diclip-toy", pretrained="diclip:toy/clip.safetensors"))
    cfg = DiffusionConfig(source="diclip:toy/diffusion")
    pipe = build_diffusion(cfg.source)
    assert capture_timestep(pipe, cfg) == 101  # SD 2.1-base's scheduler ships with the toy model
    from diclip.bundled import resolve

    card = json.load(open(resolve("diclip:toy/clip_card.json")))
    assert card["size_bytes"] == os.path.getsize(resolve("diclip:toy/clip.safetensors"))
    best = max(r["zeroshot_map"] for r in card["eval_history"])
    assert best > 0.9  # the recipe's measured zero-shot mAP (chance is ~0.5)
    # weights are the trained ones, not a fresh init: fp16 on disk, loaded into the fp32 model
    sd = clip.model.state_dict()
    assert torch.isfinite(sd["visual.conv1.weight"]).all() and sd["visual.conv1.weight"].dtype == torch.float32
    sizes = {os.path.join(r, f): os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(resolve("diclip:toy"))
             for f in fs}
    weights = sum(v for k, v in sizes.items() if k.endswith(".safetensors"))
    # the budget is 20 MB in all: 17.7 MB of weights, 19.3 MB with the CLIP BPE tokenizer (vocab.json +
    # merges.txt, not the 3.6 MB tokenizer.json: diclip.toy.package.lean_tokenizer), cards and curves
    assert weights < 18.5e6 and sum(sizes.values()) <= 20e6, (weights, sum(sizes.values()))
    assert not os.path.exists(os.path.join(resolve("diclip:toy/diffusion"), "tokenizer", "tokenizer.json"))
