"""Oracle for the reference's diffusion pass (diffusion_model/stable_diffusion.py + Processor.py).

Independent of ``diclip``: takes a diffusers ``StableDiffusionPipeline`` and restates what the
reference's ``diffusion.forward`` / ``one_step`` and its attention processor do:

* ``image_processor.preprocess(img01, height, width)`` (resize to the crop, ``2x - 1``), VAE encode,
  ``latent_dist.mean * scaling_factor``;
* ``set_timesteps(50)`` on the pipeline's own scheduler, ``t = timesteps[45]``, ``add_noise`` with the
  given noise (the reference draws it unseeded; here it is an input);
* ``encode_prompt("")`` without classifier-free guidance, one UNet call;
* at each hooked self-attention layer: attention probabilities ``softmax(q k^T * scale)`` per head
  (kept for RAR) and, for the VCE layer, per-head q and k bilinearly resized from the layer's grid to
  the CLIP grid (align_corners=False) and multiplied, ``q_ k_^T`` (no scale, no softmax).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def capture(pipe, images01: torch.Tensor, noise: torch.Tensor, layers: list[str], *, patch: int = 16,
            steps: int = 50, index: int = 45) -> dict:
    """One reference diffusion pass on ``images01`` [B, 3, H, W] in [0, 1]; returns {layer: {raw, qk}}."""
    h, w = images01.shape[-2:]
    clip_grid = (h // patch, w // patch)
    store: dict = {}
    before = dict(pipe.unet.attn_processors)
    procs = dict(before)
    for layer in layers:
        procs[f"{layer}.processor"] = _Recorder(store, layer, clip_grid)
    pipe.unet.set_attn_processor(procs)
    try:
        _one_step(pipe, images01, noise, steps, index)
    finally:
        pipe.unet.set_attn_processor(before)  # leave the pipeline as it was given
    return store


def _one_step(pipe, images01: torch.Tensor, noise: torch.Tensor, steps: int, index: int) -> None:
    h, w = images01.shape[-2:]
    with torch.no_grad():
        x = pipe.image_processor.preprocess(images01, height=h, width=w).to(pipe.unet.dtype)
        latent = pipe.vae.encode(x)[0].mean * pipe.vae.config.scaling_factor
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        t = sched.timesteps[index]
        latents = sched.add_noise(latent, noise.to(latent.dtype), t)
        embeds, _ = pipe.encode_prompt("", pipe.device, latents.shape[0], do_classifier_free_guidance=False)
        pipe.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)
