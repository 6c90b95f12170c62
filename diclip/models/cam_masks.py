"""Training-free masks and cache features for diffusion-generated single-class images.

The KV cache is built *from* masks of generated images, so those masks cannot use the cache: they
come from the method's training-free CAM path with VCE only (reference
``maintain_kv_cache/both_fore_bkg/generate_mask_for_diff_data.py``):

    image -> square ``image_size`` -> diffusion pass (seeded per item) -> ACR VCE map + RAR transition
          -> CLIP with VCE -> features normalised over the token axis (as ``DiCLIP.forward``)
          -> surgery CAM (foreground prompts + background words) for the one generated class
          -> CLIP-affinity propagation in CAM boxes -> RAR walk -> label map at the original size

:class:`VCEFeatureExtractor` is the shared front half (diffusion + CLIP with VCE); the ``cache`` stage
uses it to read keys in exactly the feature space the CAMs (and the cache retrieval) work in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diclip.config import JobSpec
from diclip.data import class_set_for
from diclip.method.cam import surgery_cam
from diclip.method.pseudo import pseudo_labels, rar_transition_from_mean
from diclip.models.attention_capture import CapturedAttention, DiffusionAttention
from diclip.models.clip import build_clip, class_text_features
from diclip.models.diffusion_maps import noise_seed, rar_mean, vce_compact
from diclip.models.diffusion import build_diffusion_from_config, maybe_enable_xformers
from diclip.models.vce import VCEVisionEncoder, VisionOutput


def to_square_batch(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HxWx3 images -> [B, 3, size, size] float in [0, 1]: ``F.interpolate`` bilinear
    (align_corners=False, no antialias), as the reference resizes its inputs to 320 x 320."""
    out = []
    for img in images:
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an RGB HxWx3 image, got shape {tuple(img.shape)}")
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
        if tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out.append(x[0])
    return torch.stack(out)


@dataclass
class VCEPass:
    features: torch.Tensor
    """[B, 1+N, C] CAM-space features: surgery-path tokens normalised over the token axis (dim 1)."""
    vision: VisionOutput
    capture: CapturedAttention


class VCEFeatureExtractor:
    """Frozen diffusion (for the VCE map) + CLIP with VCE, loaded once; ``__call__`` on [0, 1] images."""

    def __init__(self, spec: JobSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.clip = build_clip(spec.model.clip, self.device)
        pipe = build_diffusion_from_config(spec.model.diffusion, self.device)
        maybe_enable_xformers(pipe, spec.model.diffusion.enable_xformers)  # before the capture processors
        self.diffusion = DiffusionAttention(pipe, spec.model.diffusion, self.clip.patch_size,
                                            mean=spec.model.clip.mean, std=spec.model.clip.std)
        self.encoder = VCEVisionEncoder(self.clip.model.visual, spec.model.clip.surgery_blocks)
        self.mean = torch.tensor(spec.model.clip.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.model.clip.std, device=self.device).view(1, 3, 1, 1)

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, item_ids: Sequence[str]) -> VCEPass:
        """images [B, 3, S, S] in [0, 1]; the diffusion noise is seeded by item id (reproducible anywhere)."""
        seeds = [noise_seed(i, self.spec.model.diffusion.seed) for i in item_ids]
        cap = self.diffusion(images, seeds)
        corr = vce_compact(cap, self.spec.method, self.spec.model.diffusion).expand()
        x = images.to(self.device).float()
        vis = self.encoder((x - self.mean) / self.std, corr.to(self.device) if self.spec.method.vce else None)
        feats = vis.features.float()
        # The reference normalises over the token axis (dim=1), not channels; the cache lives in this space.
        feats = feats / feats.norm(dim=1, keepdim=True)
        return VCEPass(feats, vis, cap)


class TrainingFreeMasker:
    """Masks of class ids for single-class generated images (surgery CAM + VCE, no cache yet)."""

    def __init__(self, spec: JobSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.size = spec.mask.image_size
        self.extractor = VCEFeatureExtractor(spec, device)
        self.class_set = class_set_for(spec.data)
        self.num_classes = self.class_set.num_classes
        self.text = class_text_features(self.extractor.clip, self.class_set, spec.model.clip.prompt_template)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], class_ids: Sequence[int],
                 item_ids: Sequence[str]) -> list[np.ndarray]:
        """uint8 HxWx3 images, their class ids (1..K-1) and item ids -> uint8 label maps at each image's size.

        Pixels are 0 (background) or the image's class id: background = 1 - max foreground.
        """
        if not len(images):
            return []
        k = self.num_classes
        for c in class_ids:
            if not 1 <= int(c) < k:
                raise ValueError(f"class id {c} is not a foreground class of {self.class_set.name} (1..{k - 1})")
        x = to_square_batch(images, self.size)
        out = self.extractor(x, item_ids)
        cams = surgery_cam(out.features, self.text, k - 1)  # [B, N, K-1]
        rar_trans = rar_transition_from_mean(rar_mean(out.capture))
        labels = F.one_hot(torch.as_tensor([int(c) - 1 for c in class_ids]), k - 1).float().to(cams.device)
        m = self.spec.method
        masks: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for b, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[:2]), []).append(b)
        for size, idx in by_size.items():
            sel = torch.as_tensor(idx, device=cams.device)
            _, label = pseudo_labels(
                cams[sel], out.vision.attn[sel], rar_trans[sel], labels[sel], size,
                grid=out.vision.grid, attn_grid=out.capture.rar_grid,
                caa_threshold=m.caa_threshold, caa_layers=m.caa_layers,
                rar_steps=self.spec.mask.rar_steps, label_threshold=m.label_threshold,
            )
            for j, b in enumerate(idx):
                masks[b] = label[j].to(torch.uint8).cpu().numpy()
        return masks  # type: ignore[return-value]
