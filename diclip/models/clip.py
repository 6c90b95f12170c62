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

from diclip import bundled
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
    """Make the bundled model configs (``diclip-tiny``, ``diclip-toy``) known to open_clip (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        for name in ("diclip-tiny.json", "diclip-toy.json"):
            open_clip.add_model_config(str(resources.files("diclip") / "resources" / name))
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


def _is_file(pretrained: str) -> bool:
    return os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def resolve_quick_gelu(cfg: ClipConfig) -> bool:
    """Whether the model must use QuickGELU: the pretrained tag's training setting wins.

    open_clip builds ``nn.GELU`` for ``ViT-B-16`` even with ``pretrained="openai"`` (it only warns),
    although OpenAI trained those weights with QuickGELU; every feature would differ from the
    reference's. So the tag's own config decides, and an explicit setting that contradicts it is an
    error rather than a silently different model.
    """
    try:
        model_q = bool((open_clip.get_model_config(cfg.name) or {}).get("quick_gelu", False))
    except Exception:  # hf-hub:/local-dir: configs that cannot be read here; create_model will say why
        model_q = False
    tag_q = None
    if cfg.pretrained and not _is_file(cfg.pretrained) and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
        tag_q = bool(tag_cfg.get("quick_gelu", False)) if tag_cfg else None
    if tag_q is not None:
        if cfg.quick_gelu is not None and cfg.quick_gelu != tag_q:
            raise ModelError(f"model.clip.quick_gelu={cfg.quick_gelu} contradicts the pretrained tag "
                             f"{cfg.name}/{cfg.pretrained}, which was trained with quick_gelu={tag_q}; "
                             "remove the setting")
        want = tag_q
    else:
        want = model_q if cfg.quick_gelu is None else bool(cfg.quick_gelu)
    if model_q and not want:
        raise ModelError(f"model.clip.quick_gelu=false contradicts the model config {cfg.name!r} (QuickGELU); "
                         "use the plain model name")
    return want


def build_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> ClipBundle:
    """Frozen open_clip model in eval mode + its tokenizer (QuickGELU as the weights were trained)."""
    register_bundled_configs()
    if cfg.name not in open_clip.list_models() and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        raise ModelError(f"unknown CLIP model {cfg.name!r}; use an open_clip name (e.g. ViT-B-16) or diclip-tiny")
    quick_gelu = resolve_quick_gelu(cfg)
    try:
        if cfg.pretrained:
            weights = bundled.resolve(cfg.pretrained)
            if _is_file(weights) and not os.path.isfile(weights):
                raise ModelError(f"CLIP checkpoint not found: {cfg.pretrained}")
            model = open_clip.create_model(cfg.name, pretrained=weights, device=device,
                                           force_quick_gelu=quick_gelu)
        else:
            with torch.random.fork_rng(devices=[]), _quiet("root"):
                torch.manual_seed(cfg.seed)
                model = open_clip.create_model(cfg.name, pretrained=None, device=device, force_quick_gelu=quick_gelu)
    except ModelError:
        raise
    except Exception as e:  # download failures, bad checkpoints, shape mismatches
        raise ModelError(f"cannot build CLIP {cfg.name!r} with pretrained={cfg.pretrained!r}: "
                         f"{' '.join(str(e).split())[:300]}") from e
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    model_id = f"{cfg.name}/{cfg.pretrained or f'random-seed{cfg.seed}'}" + ("+quickgelu" if quick_gelu else "")
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
