"""CLIP factory on open_clip, plus class-text encoding.

One string names the weights, like open_clip: ``pretrained`` is an open_clip tag (``openai``), a
local checkpoint file (``.pt``/``.bin``/``.safetensors``, loaded with ``weights_only=True``), or ""
for a seeded random init. ``diclip-tiny`` is a bundled model config (4-layer ViT, 64 wide) with the
same classes as ViT-B/16, used by the demo and the tests.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from importlib import resources

import torch

import diclip  # noqa: F401  (torchvision shim before open_clip)
import open_clip

from diclip.config import ClipConfig
from diclip.errors import ModelError
from diclip.logging import get_logger

log = get_logger(__name__)
_REGISTERED = False


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence open_clip's "no pretrained weights" warning for intentional random inits."""
    lg = logging.getLogger() if logger_name == "root" else logging.getLogger(logger_name)
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def register_bundled_configs() -> None:
    """Make the bundled model configs (``diclip-tiny``) known to open_clip (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        open_clip.add_model_config(str(resources.files("diclip") / "resources" / "diclip-tiny.json"))
        _REGISTERED = True


@dataclass
class ClipBundle:
    model: open_clip.CLIP
    tokenizer: object
    model_id: str
    """``name/pretrained`` for manifests and cache cards."""

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def width(self) -> int:
        return int(self.model.visual.transformer.width)

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def patch_size(self) -> int:
        p = self.model.visual.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)


def build_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> ClipBundle:
    """Frozen open_clip model in eval mode + its tokenizer."""
    register_bundled_configs()
    if cfg.name not in open_clip.list_models() and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        raise ModelError(f"unknown CLIP model {cfg.name!r}; use an open_clip name (e.g. ViT-B-16) or diclip-tiny")
    try:
        if cfg.pretrained:
            if os.path.sep in cfg.pretrained or cfg.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
                if not os.path.isfile(cfg.pretrained):
                    raise ModelError(f"CLIP checkpoint not found: {cfg.pretrained}")
            model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained, device=device)
        else:
            with torch.random.fork_rng(devices=[]), _quiet("root"):
                torch.manual_seed(cfg.seed)
                model = open_clip.create_model(cfg.name, pretrained=None, device=device)
    except ModelError:
        raise
    except Exception as e:  # download failures, bad checkpoints, shape mismatches
        raise ModelError(f"cannot build CLIP {cfg.name!r} with pretrained={cfg.pretrained!r}: "
                         f"{' '.join(str(e).split())[:300]}") from e
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    model_id = f"{cfg.name}/{cfg.pretrained or f'random-seed{cfg.seed}'}"
    log.debug("built CLIP %s", model_id)
    return ClipBundle(model=model, tokenizer=tokenizer, model_id=model_id)


@torch.no_grad()
def encode_texts(bundle: ClipBundle, names: list[str], template: str = "a clean origami {}.") -> torch.Tensor:
    """L2-normalised text embedding per name with one prompt template: [len(names), embed_dim]."""
    device = next(bundle.model.parameters()).device
    tokens = bundle.tokenizer([template.format(n) for n in names]).to(device)
    feats = bundle.model.encode_text(tokens).float()
    return feats / feats.norm(dim=-1, keepdim=True)


def class_text_features(bundle: ClipBundle, class_set, template: str) -> torch.Tensor:
    """Foreground prompt rows then background-word rows, as the CAM functions expect."""
    return encode_texts(bundle, list(class_set.prompt_names) + list(class_set.background_words), template)
