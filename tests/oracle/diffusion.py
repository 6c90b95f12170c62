"""Oracle for the reference's diffusion pass (diffusion_model/stable_diffusion.py + Processor.py).

Independent of ``diclip``: takes a diffusers ``StableDiffusionPipeline`` and restates what the
reference's ``diffusion.forward`` / ``one_step`` and its attention processor do:

* the input path of ``DiCLIP_model.extract_diff_attn``, from the normalised crop the data loader gives
  (:func:`normalize_img`, ExCEL ``datasets/transforms.normalize_img``: float32, ImageNet mean/std on
  0..255 values): :func:`denormalize_img` (``utils/imutils.denormalize_img``: ``x * std + mean`` per
  channel in float32, then ``.type(torch.uint8)``, a truncation), ``/ 255.0``, ``.half()``, then the
  pipeline's ``image_processor.preprocess(img, height, width)`` (resize to the crop, ``2x - 1`` on the
  fp16 tensor), ``.to(unet dtype)``, VAE encode, ``latent_dist.mean * scaling_factor``;
* ``set_timesteps(50)`` on the pipeline's own scheduler, ``t = timesteps[45]``, ``add_noise`` with the
  given noise (the reference draws it unseeded; here it is an input);
* ``encode_prompt("")`` without classifier-free guidance, one UNet call;
* at each hooked self-attention layer: attention probabilities ``softmax(q k^T * scale)`` per head
  (kept for RAR) and, for the VCE layer, per-head q and k bilinearly resized from the layer's grid to
  the CLIP grid (align_corners=False) and multiplied, ``q_ k_^T`` (no scale, no softmax).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MEAN_255 = [123.675, 116.28, 103.53]
STD_255 = [58.395, 57.12, 57.375]


def normalize_img(pixels: np.ndarray) -> np.ndarray:
    """ExCEL ``datasets/transforms.normalize_img``: [..., H, W, 3] pixel values -> float32 ``(x - mean) / std``
    per channel (numpy float32 arithmetic; the Python-float constants become float32)."""
    arr = np.asarray(pixels)
    out = np.empty_like(arr, np.float32)
    for c in range(3):
        out[..., c] = (arr[..., c].astype(np.float32) - np.float32(MEAN_255[c])) / np.float32(STD_255[c])
    return out


def denormalize_img(imgs: torch.Tensor) -> torch.Tensor:
    """``utils/imutils.denormalize_img`` (ToCo/ExCEL): [B, 3, H, W] float32 -> uint8, no clamp, truncating cast."""
    out = torch.zeros_like(imgs)
    for c in range(3):
        out[:, c] = imgs[:, c] * STD_255[c] + MEAN_255[c]
    return out.type(torch.uint8)


def vae_input(image_processor, normalised: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ``extract_diff_attn`` + ``diffusion.forward`` hand to the VAE, from the normalised crop [B, 3, H, W]:
    ``image_processor`` is the pipeline's (diffusers ``VaeImageProcessor``), ``dtype`` its UNet's."""
    h, w = normalised.shape[-2:]
    img = denormalize_img(normalised) / 255.0
    img = img.half()
    return image_processor.preprocess(img, height=h, width=w).to(dtype)


class _Recorder:
    """Attention processor that computes the layer the classic way (head_to_batch_dim, scores) and records."""

    def __init__(self, store: dict, name: str, clip_grid: tuple[int, int]):
        self.store, self.name, self.clip_grid = store, name, clip_grid

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        kk = attn.head_to_batch_dim(attn.to_k(hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(hidden_states))
        probs = attn.get_attention_scores(q, kk, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        heads = attn.heads
        side = int(math.isqrt(length))
        assert side * side == length, "the oracle handles square grids (as the reference)"

        def resize(t):  # [B*H, L, D] -> [B*H, n, D] on the CLIP grid
            bh, _, d = t.shape
            img = t.transpose(-2, -1).reshape(bh, d, side, side)
            img = F.interpolate(img, size=self.clip_grid, mode="bilinear", align_corners=False)
            return img.reshape(bh, d, -1).transpose(-2, -1)

        n = self.clip_grid[0] * self.clip_grid[1]
        qk = torch.bmm(resize(q), resize(kk).transpose(-2, -1)).reshape(batch, heads, n, n)
        self.store[self.name] = dict(raw=probs.reshape(batch, heads, length, length), qk=qk)
        return out


def capture(pipe, normalised: torch.Tensor, noise: torch.Tensor, layers: list[str], *, patch: int = 16,
            steps: int = 50, index: int = 45) -> dict:
    """One reference diffusion pass on the normalised crop [B, 3, H, W] (:func:`normalize_img`, channels
    first); returns {layer: {raw, qk}}."""
    h, w = normalised.shape[-2:]
    clip_grid = (h // patch, w // patch)
    store: dict = {}
    before = dict(pipe.unet.attn_processors)
    procs = dict(before)
    for layer in layers:
        procs[f"{layer}.processor"] = _Recorder(store, layer, clip_grid)
    pipe.unet.set_attn_processor(procs)
    try:
        _one_step(pipe, normalised, noise, steps, index)
    finally:
        pipe.unet.set_attn_processor(before)  # leave the pipeline as it was given
    return store


def _one_step(pipe, normalised: torch.Tensor, noise: torch.Tensor, steps: int, index: int) -> None:
    with torch.no_grad():
        x = vae_input(pipe.image_processor, normalised, pipe.unet.dtype)
        latent = pipe.vae.encode(x)[0].mean * pipe.vae.config.scaling_factor
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        t = sched.timesteps[index]
        latents = sched.add_noise(latent, noise.to(latent.dtype), t)
        embeds, _ = pipe.encode_prompt("", pipe.device, latents.shape[0], do_classifier_free_guidance=False)
        pipe.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)
