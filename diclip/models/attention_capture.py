"""Diffusion self-attention capture through a diffusers attention processor.

``CaptureProcessor`` computes a self-attention layer exactly like diffusers' SDPA processor and, on
the side, keeps that layer's per-head queries and keys (after the head split, before scaling). It is
installed on the two layers the method reads - the VCE layer (``up_blocks.1.attentions.2...attn1``)
and the RAR layer (``up_blocks.3.attentions.1...attn1``) - by copying ``unet.attn_processors``,
replacing those two keys and passing the whole dict back (no monkey-patching of ``forward``).

``DiffusionAttention`` runs the method's single UNet pass: VAE-encode the image (made the reference's way,
:func:`~diclip.method.diffusion_input.diffusion_input`: uint8-truncated, fp16 ``2x - 1``), add noise at
``timesteps[45]`` of 50 steps of the checkpoint's own scheduler (:func:`capture_timestep`; seeded per
image, so a re-run or another actor gives the same map), one UNet call with the empty prompt, and returns

* ``vce``: per-head ``q k^T`` on the CLIP token grid [B, H, N, N] (q and k bilinearly resized from the
  layer's own grid, no scale, no softmax) - the input of ACR;
* ``rar_q``/``rar_k``: the RAR layer's q and k for the configured heads [B, h, M, d] and its grid.
  The dense softmax map is ``softmax(q k^T * scale)``; see :func:`rar_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from diclip.config import DiffusionConfig
from diclip.method.diffusion_input import IMAGENET_MEAN, IMAGENET_STD, diffusion_input
from diclip.models.diffusion import capture_timestep


class CaptureProcessor:
    """Self-attention processor that records per-head q and k into ``store[name]``."""

    def __init__(self, store: dict, name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            raise RuntimeError(f"{self.name}: CaptureProcessor is for self-attention (attn1) layers only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        d = k.shape[-1] // heads
        q = q.view(batch, length, heads, d).transpose(1, 2)
        k = k.view(batch, length, heads, d).transpose(1, 2)
        v = v.view(batch, length, heads, d).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        self.store[self.name] = (q.detach(), k.detach(), float(attn.scale))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, length, heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_capture(unet, layers: Sequence[str], store: dict) -> None:
    """Install :class:`CaptureProcessor` on ``layers`` (module paths, e.g. ``up_blocks.1...attn1``).

    Installed last, after anything that resets processors (xformers, LoRA), and verified.
    """
    procs = dict(unet.attn_processors)
    for layer in layers:
        key = f"{layer}.processor"
        if key not in procs:
            self_attn = sorted(k[: -len(".processor")] for k in procs if k.endswith("attn1.processor"))
            raise ValueError(f"UNet has no attention layer {layer!r}; self-attention layers: {', '.join(self_attn[:6])} ...")
        procs[key] = CaptureProcessor(store, layer)
    unet.set_attn_processor(procs)
    installed = unet.attn_processors
    for layer in layers:
        if not isinstance(installed[f"{layer}.processor"], CaptureProcessor):
            raise RuntimeError(f"capture processor on {layer} was replaced")


def layer_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial grid of a UNet layer with ``tokens`` tokens, from the latent size.

    Each UNet level halves the size with a stride-2, padding-1 conv, i.e. ``ceil(n / 2)``.
    """
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"cannot place {tokens} tokens on a grid derived from latent {latent_hw}")


def resize_tokens(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize per-head token features [B, H, L, D] from grid ``src`` to ``dst``."""
    b, h, l, d = x.shape
    if tuple(src) == tuple(dst):
        return x
    img = x.permute(0, 1, 3, 2).reshape(b * h, d, src[0], src[1]).float()
    img = F.interpolate(img, size=tuple(dst), mode="bilinear", align_corners=False)
    return img.reshape(b, h, d, dst[0] * dst[1]).permute(0, 1, 3, 2)


def rar_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense softmax self-attention per head from q, k [B, h, M, d] -> [B, h, M, M] (fp32)."""
    return (q.float() @ k.float().transpose(-1, -2) * scale).softmax(-1)


@dataclass
class CapturedAttention:
    vce: torch.Tensor
    """[B, H, N, N] per-head q k^T on the CLIP grid (all heads of the VCE layer)."""
    clip_grid: tuple[int, int]
    rar_q: torch.Tensor
    """[B, h, M, d] queries of the RAR layer for the configured heads."""
    rar_k: torch.Tensor
    rar_scale: float
    rar_grid: tuple[int, int]

    def rar_dense(self) -> torch.Tensor:
        """[B, h, M, M] softmax attention of the configured heads."""
        return rar_attention(self.rar_q, self.rar_k, self.rar_scale)


class DiffusionAttention:
    """The method's one-step diffusion pass on a pipeline; call with images in [0, 1].

    ``mean``/``std``: the CLIP normalisation (``model.clip.mean/std``) whose round trip the reference's
    diffusion input goes through (see :func:`~diclip.method.diffusion_input.diffusion_input`)."""

    def __init__(self, pipe, cfg: DiffusionConfig, patch_size: int = 16, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.pipe = pipe
        self.cfg = cfg
        self.patch = patch_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.heads = list(cfg.heads)
        self.store: dict = {}
        install_capture(pipe.unet, [cfg.vce_layer, cfg.rar_layer], self.store)
        self.timestep = torch.tensor(capture_timestep(pipe, cfg), device=pipe.device)
        with torch.no_grad():
            tok = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
            self.empty = pipe.text_encoder(tok.input_ids.to(pipe.device))[0]

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def noise(self, shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor:
        gens = [torch.Generator(device="cpu").manual_seed(int(s) % (2**63)) for s in seeds]
        return torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> CapturedAttention:
        b, _, h, w = images.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {h}x{w} must be a multiple of {self.patch}")
        pipe = self.pipe
        x = diffusion_input(images.to(self.device), self.dtype, self.mean, self.std)
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        noisy = pipe.scheduler.add_noise(latents, self.noise(tuple(latents.shape), seeds), self.timestep[None])
        self.store.clear()
        pipe.unet(noisy, self.timestep, encoder_hidden_states=self.empty.expand(b, -1, -1).to(self.dtype),
                  return_dict=False)
        latent_hw = tuple(latents.shape[-2:])
        clip_grid = (h // self.patch, w // self.patch)
        q, k, _ = self.store[self.cfg.vce_layer]
        src = layer_grid(q.shape[2], latent_hw)
        qr = resize_tokens(q.float(), src, clip_grid)
        kr = resize_tokens(k.float(), src, clip_grid)
        vce = qr @ kr.transpose(-1, -2)
        rq, rk, scale = self.store[self.cfg.rar_layer]
        heads = [hh for hh in self.heads]
        if max(heads) >= rq.shape[1]:
            raise ValueError(f"heads {heads} but the RAR layer has {rq.shape[1]} heads")
        self.store.clear()
        return CapturedAttention(
            vce=vce,
            clip_grid=clip_grid,
            rar_q=rq[:, heads].contiguous(),
            rar_k=rk[:, heads].contiguous(),
            rar_scale=scale,
            rar_grid=layer_grid(rq.shape[2], latent_hw),
        )
