"""The image the diffusion VAE encodes, exactly as the reference makes it.

The reference does not hand Stable Diffusion the crop's pixels. Its training crop is normalised for
CLIP on 0..255 values (``datasets/transforms.normalize_img``, float32); ``extract_diff_attn`` turns that
back into pixels with ``utils/imutils.denormalize_img`` - ``x * std + mean`` per RGB channel in float32,
then ``.type(torch.uint8)``, which truncates (a pixel whose round trip lands on 254.99998 becomes 254;
-7.6e-6 becomes 0) - divides by 255, casts to fp16 (``.half()``), and the pipeline's
``image_processor.preprocess`` computes ``2 x - 1`` on that fp16 tensor. Feeding exact ``2 x - 1`` floats
instead moved the ACR-refined VCE map by up to 30% (relative) and flipped 0.19% of one iteration's
pseudo-label pixels in a side-by-side run of the published code, so every caller that runs the diffusion
pass (online training, the ``correlate`` maps and crop bank, masks, cache features, evaluation) goes
through :func:`diffusion_input`.

:data:`DIFFUSION_INPUT` names this recipe in the settings of the stages that store what the diffusion
pass produced, so rows made from the earlier input (exact ``2 x - 1`` in the model's dtype) are stale.
"""
from __future__ import annotations

from typing import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The reference's ``normalize_img`` constants, over 255 (it uses 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375)."""

DIFFUSION_INPUT = "denorm-uint8-fp16"
"""Settings tag of the recipe below (a change of it recomputes stored maps, masks and cache features)."""


def _per_channel(values: Sequence[float], ref: torch.Tensor) -> torch.Tensor:
    # x * 255 in float64, then float32: the float32 constants are the reference's (0.485 * 255 -> 123.675)
    return torch.tensor([float(v) * 255.0 for v in values], dtype=torch.float32, device=ref.device).view(1, 3, 1, 1)


def diffusion_input(images: torch.Tensor, dtype: torch.dtype, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """VAE input [B, 3, H, W] in [-1, 1] of ``dtype`` for RGB images [B, 3, H, W] in [0, 1].

    Steps (each as the reference rounds it): pixels ``images * 255`` (exact for whole pixel values:
    ``(v / 255) * 255 == v`` in float32 for every v in 0..255); normalised ``(p - mean) / std`` and back
    ``n * std + mean`` in float32 with ``mean``/``std`` times 255 (the CLIP normalisation, whose round trip
    can land just below a whole value); truncation to uint8; ``/ 255``; fp16; ``2 x - 1`` in fp16; then
    ``dtype`` (the model's: fp16 on GPU as in the reference; fp32 on CPU, where the reference's
    ``.to(self.dtype)`` after the fp16 preprocessing does the same cast).

    Values outside (-1, 256) after the round trip cannot come from an image in [0, 1]; there the
    reference's float-to-uint8 cast is undefined behaviour (CPU wraps around), so they are clamped to
    0..255 first - for every value inside that range the clamp changes nothing.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    pixels = images.float() * 255.0
    m = _per_channel(mean, pixels)
    s = _per_channel(std, pixels)
    normalised = (pixels - m) / s  # datasets/transforms.normalize_img (tensor operands: true division on any device)
    restored = normalised * s + m  # utils/imutils.denormalize_img, before its cast
    whole = restored.clamp(0.0, 255.0).to(torch.uint8)  # .type(torch.uint8): truncation toward zero
    half = (whole.float() / 255.0).half()  # `denormalize_img(img) / 255.0` then `.half()`
    return (half * 2.0 - 1.0).to(dtype)  # VaeImageProcessor.normalize on the fp16 tensor, then .to(dtype)
