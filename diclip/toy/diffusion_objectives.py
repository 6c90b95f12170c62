"""The toy diffusion model's phase-1 and phase-2 objectives on world batches: the VAE's reconstruction and
KL with the latent scaling measured after it, and the UNet's noise prediction (classifier-free caption
dropout) with its epsilon loss. Every draw comes from a generator seeded by (seed, step), so a resumed run is
bit-exact. :mod:`diclip.toy.pretrain_diffusion` runs them; phase 3 (:mod:`diclip.toy.pretrain_grouping`)
adds its objective on the same noise prediction."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diclip.data import toy_world as world
from diclip.toy.common import MetricsLog


def to_pm1(images: np.ndarray) -> torch.Tensor:
    return world.to_tensor(images, normalise=False) * 2 - 1


def vae_losses(vae, args, vstep: int, wcfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction MSE, KL per pixel) of VAE step ``vstep`` on its world batch."""
    b = world.batch(args.seed + 1, vstep * args.vae_batch, args.vae_batch, wcfg)
    x = to_pm1(b["images"])
    post = vae.encode(x).latent_dist
    # a generator per step, seeded by (seed, step): seeded and bit-exact across resume (the global RNG
    # is neither checkpointed nor seeded here)
    z = post.sample(generator=torch.Generator().manual_seed(args.seed * 1_000_003 + 500_000 + vstep))
    rec = vae.decode(z).sample
    return F.mse_loss(rec, x), post.kl().mean() / x[0].numel()


def set_scaling_factor(vae, args, wcfg, log: MetricsLog, vstep: int) -> None:
    """The latent scaling that gives unit variance on 256 held-out world images (as SD's 0.18215 does)."""
    with torch.no_grad():
        vae.eval()
        b = world.batch(args.seed + 2, 0, 256, wcfg)
        z = vae.encode(to_pm1(b["images"])).latent_dist.mean
        sf = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=sf)
        print(f"VAE scaling_factor {sf:.4f}", flush=True)
        log.write("vae", vstep, scaling_factor=sf)


def noise_prediction(comps: dict, args, b: dict, g: torch.Generator):
    """The UNet's noise prediction on world batch ``b``: latents noised at random timesteps, captions dropped
    with ``cfg_drop`` (classifier-free guidance), every draw from ``g``. Returns (prediction, noise, latents,
    timesteps); phase 3 (:mod:`diclip.toy.pretrain_grouping`) adds its objective on the same pass."""
    vae, unet, te, tok, sched = comps["vae"], comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"]
    with torch.no_grad():
        z = vae.encode(to_pm1(b["images"])).latent_dist.sample(generator=g) * vae.config.scaling_factor
    caps = [("" if torch.rand((), generator=g).item() < args.cfg_drop else c) for c in b["captions"]]
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    ctx = te(ids)[0]
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],), generator=g)
    return unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=ctx).sample, noise, z, t


def epsilon_loss(comps: dict, args, step: int, wcfg) -> torch.Tensor:
    """UNet step ``step``'s noise-prediction MSE on its world batch, from a generator seeded by (seed, step):
    bit-exact on resume."""
    b = world.batch(args.seed, step * args.batch, args.batch, wcfg)
    pred, noise, _, _ = noise_prediction(comps, args, b, torch.Generator().manual_seed(args.seed * 1_000_003 + step))
    return F.mse_loss(pred, noise)
