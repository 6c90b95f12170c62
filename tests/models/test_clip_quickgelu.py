"""QuickGELU follows the weights: open_clip's real ``openai`` loading path, through an offline HF cache.

No pretrained weights can be downloaded here, so random ViT-B/16 weights are placed where open_clip
looks for the OpenAI tag (``timm/vit_base_patch16_clip_224.openai`` in the Hugging Face cache) and
``HF_HUB_OFFLINE=1`` makes the hub resolve them locally. Runs in a subprocess because the hub reads
``HF_HOME`` when it is imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from diclip.config import ClipConfig
from diclip.errors import ModelError
from diclip.models.clip import resolve_quick_gelu

SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    home = sys.argv[1]
    os.environ["HF_HOME"] = home
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import diclip
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    repo = os.path.join(home, "hub", "models--timm--vit_base_patch16_clip_224.openai")
    snap = os.path.join(repo, "snapshots", "0" * 40)
    os.makedirs(snap)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0" * 40)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              os.path.join(snap, "open_clip_model.safetensors"))

    from diclip.config import ClipConfig
    from diclip.models.clip import build_clip
    bundle = build_clip(ClipConfig(name="ViT-B-16", pretrained="openai"))
    blk = bundle.model.visual.transformer.resblocks[0]
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        got = bundle.model.encode_image(x)
        want = src.eval().encode_image(x)
        gelu = open_clip.create_model("ViT-B-16", pretrained=None)
        gelu.load_state_dict(src.state_dict())
        plain = gelu.eval().encode_image(x)
    print(json.dumps({
        "act": type(blk.mlp.gelu).__name__,
        "text_act": type(bundle.model.transformer.resblocks[0].mlp.gelu).__name__,
        "model_id": bundle.model_id,
        "max_diff_quickgelu": float((got - want).abs().max()),
        "max_diff_gelu": float((got - plain).abs().max()),
    }))
""")


@pytest.mark.slow
def test_openai_tag_builds_quickgelu_through_real_loading_path(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "hf")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["act"] == "QuickGELU" and out["text_act"] == "QuickGELU"
    assert out["model_id"] == "ViT-B-16/openai+quickgelu"
    assert out["max_diff_quickgelu"] < 1e-5  # exactly the model the weights were trained as
    assert out["max_diff_gelu"] > 1e-3  # and nn.GELU would have been a different model


def test_quick_gelu_resolution_and_contradictions():
    assert resolve_quick_gelu(ClipConfig(name="ViT-B-16", pretrained="openai"))
    assert resolve_quick_gelu(ClipConfig(name="ViT-B-16", pretrained="openai", quick_gelu=True))
    assert not resolve_quick_gelu(ClipConfig(name="ViT-B-16", pretrained=""))  # random init: the model config
    assert resolve_quick_gelu(ClipConfig(name="ViT-B-16", pretrained="", quick_gelu=True))
    assert resolve_quick_gelu(ClipConfig(name="ViT-B-16-quickgelu", pretrained=""))
    # a local file of OpenAI weights carries no tag: the setting decides
    assert resolve_quick_gelu(ClipConfig(name="ViT-B-16", pretrained="/w/ViT-B-16.pt", quick_gelu=True))
    with pytest.raises(ModelError, match="contradicts the pretrained tag ViT-B-16/openai"):
        resolve_quick_gelu(ClipConfig(name="ViT-B-16", pretrained="openai", quick_gelu=False))
    with pytest.raises(ModelError, match="contradicts the model config"):
        resolve_quick_gelu(ClipConfig(name="ViT-B-16-quickgelu", pretrained="", quick_gelu=False))


def test_validate_refuses_a_quick_gelu_contradiction_before_ray(tmp_path):
    """The contradiction is a spec error: ``validate`` (and ``run``) refuse it in one line before any actor
    loads weights, whether or not the weights are on this machine."""
    from diclip.config import load_spec
    from diclip.models.sources import check_stage_models

    spec = load_spec("configs/voc.yaml", [f"output_uri={tmp_path}", "model.clip.quick_gelu=false"])
    with pytest.raises(ModelError) as e:
        check_stage_models(spec, ["train"])
    assert "stage train: model.clip.quick_gelu=False contradicts the pretrained tag" in str(e.value)
    assert "\n" not in str(e.value)
