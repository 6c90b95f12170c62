"""Train a tiny Stable-Diffusion-shaped model (VAE, text encoder, UNet) on the toy world
(``diclip.data.toy_world``) whose read heads group object pixels, and measure that they do.

    python -m diclip.toy.pretrain_diffusion --out /work/toy_runs/v2/unet

The defaults are the shipped model's recipe. Geometry: 48 px images; a small ``AutoencoderKL`` with
one downsampling (latent 24x24); a UNet with the topology of ``diclip.models.diffusion.tiny_components``
(4 down/up blocks, 2 layers per block, channels 32/32/64/64, heads 4/4/8/8), so its levels are
24/12/6/3: the VCE layer ``up_blocks.1.attentions.2`` reads 6x6 = the CLIP grid (48 px / patch 8)
and the RAR layer ``up_blocks.3.attentions.1`` reads 24x24 (4x the CLIP grid). The pipeline's
scheduler is SD 2.1-base's PNDM (``SD21_BASE_SCHEDULER``), so the method's capture noise is
``timesteps[45]`` of 50 = t 101, and training noises with the same betas.

Phase 1 (``--vae-steps``): the VAE on reconstruction + a tiny KL; its ``scaling_factor`` is set to
1/std of the latents. Phase 2: UNet and a tiny ``transformers.CLIPTextModel`` trained jointly with
the standard epsilon-prediction loss (uniform t in [0, 1000)) on the captions (10% replaced by ""
for classifier-free guidance).

Phase 3 (``--group-steps``, ``diclip.toy.pretrain_grouping``): the epsilon loss goes on, and the heads the
method reads (heads 1, 2 of the VCE and RAR layers) are also trained to attend over their own object
(``diclip.toy.grouping_objective``, for samples noised at ``t < --group-tmax``): a toy-only stand-in for
the object grouping SD's self-attention gets from its pretraining; without it this model's attention does
not group objects (``docs/quality.md``). ``--init-from FOLDER`` starts phase 3 from a released folder
instead of running phases 1-2 (how the shipped model was made; its card says so).

Grouping evaluation (``metrics.jsonl``, kind ``eval``), through the pipeline's own capture
(``DiffusionAttention``: VAE mean, noise at the scheduler's ``timesteps[45]``, empty prompt): for
every token inside an object, the attention mass landing on the same object instance (``*_mass``)
and that mass divided by the object's share of tokens (``*_lift``; 1 = no grouping). Maps: ``rar``
= head-mean softmax of the RAR layer (heads 1,2; what RAR uses), ``vce`` = the pipeline's
thresholded, chained q k^T of the VCE layer, ``vce_acr`` = that map after ACR
(``refine_correlation``: what VCE adds to CLIP's attention), ``vce_soft`` = the VCE layer's softmax
attention (heads 1,2 mean). Reference rows: the same for the untrained UNet (the step-0 eval) and a
parameter-free colour kernel ``exp(-|rgb_i-rgb_j|^2 / 2 sigma^2)`` on the image average-pooled to
the grid (``colour*``).

Resumable like ``pretrain_clip``; final model as a diffusers ``save_pretrained`` folder (fp16
safetensors) in ``--out/pipeline``, loadable by ``diclip.models.diffusion.build_diffusion(path)``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from diclip.toy.common import one_thread

one_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import diclip  # noqa: F401,E402
from diclip.config import DiffusionConfig  # noqa: E402
from diclip.method.acr import chain_heads, normalize_attention, refine_correlation  # noqa: E402
from diclip.models.attention_capture import DiffusionAttention  # noqa: E402
from diclip.models.diffusion import SD21_BASE_SCHEDULER, tiny_tokenizer  # noqa: E402
from diclip.data import toy_world as world  # noqa: E402
from diclip.toy.common import MetricsLog, latest_checkpoint, plot_metrics, save_checkpoint, warmup_cosine  # noqa: E402
from diclip.toy.diffusion_objectives import epsilon_loss, set_scaling_factor, vae_losses  # noqa: E402

VAL_OFFSET = 10_000_000


def build_components(args, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ch = tuple(int(c) for c in args.unet_channels.split(","))
    heads = tuple(int(c) for c in args.unet_heads.split(","))
    latent = args.size // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=ch,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=args.text_width, attention_head_dim=heads,
            norm_num_groups=8, use_linear_projection=True,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8, layers_per_block=1,
            sample_size=args.size,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=args.text_width, intermediate_size=2 * args.text_width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=args.text_width,
        ))
    # SD 2.1-base's scheduler: the capture noises at its timesteps[45] of 50 (t = 101); training
    # uses the same betas (add_noise), so the model is trained for the noise level it is read at.
    scheduler = PNDMScheduler.from_config(SD21_BASE_SCHEDULER)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), scheduler=scheduler)


def make_pipe(comps: dict):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- eval
def token_fractions(inst: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """[B, K+1, M]: fraction of each token (grid cell) covered by instance k (k=0: background)."""
    B, H, W = inst.shape
    k = int(inst.max()) + 1
    onehot = F.one_hot(torch.from_numpy(inst.astype(np.int64)), k).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, grid).flatten(2)


def grouping(attn: torch.Tensor, frac: torch.Tensor, inside: float = 0.75) -> tuple[float, float, int]:
    """attn [B, M, M] (rows = queries, rows need not sum to 1), frac [B, K+1, M].

    For query tokens at least ``inside`` covered by one object: mean share of the row's mass on
    that object's tokens (weighted by coverage), and that share over the object's token share."""
    a = attn.clamp_min(0)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    masses, lifts = [], []
    for k in range(1, frac.shape[1]):
        w = frac[:, k]  # [B, M]
        q = w >= inside
        if not q.any():
            continue
        mass = (a @ w[..., None])[..., 0]  # [B, M] mass of each query on object k
        share = w.sum(-1, keepdim=True) / w.shape[-1]  # [B, 1]
        masses.append(mass[q])
        lifts.append((mass / share.clamp_min(1e-6))[q])
    if not masses:
        return float("nan"), float("nan"), 0
    m, l_ = torch.cat(masses), torch.cat(lifts)
    return float(m.mean()), float(l_.mean()), int(m.numel())


def colour_kernel(images: np.ndarray, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    x = world.to_tensor(images, normalise=False)  # [B,3,H,W] in [0,1]
    x = F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)  # [B, M, 3]
    d2 = torch.cdist(x, x).pow(2)
    return torch.exp(-d2 / (2 * sigma**2))


@torch.no_grad()
def evaluate(pipe, args, count: int, colour: bool = False) -> dict:
    """Grouping scores of the RAR and VCE layers (and optionally the colour kernel) on val samples."""
    dcfg = DiffusionConfig(source="toy")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
    procs = dict(pipe.unet.attn_processors)
    cap = DiffusionAttention(pipe, dcfg, patch_size=args.patch)
    acc: dict[str, list] = {}
    for start in range(0, count, 64):
        n = min(64, count - start)
        b = world.batch(args.seed, VAL_OFFSET + start, n, world.WorldConfig(size=args.size))
        imgs = world.to_tensor(b["images"], normalise=False)
        out = cap(imgs, seeds=[VAL_OFFSET + start + i for i in range(n)])
        rar = out.rar_dense().mean(1)
        frac_rar = token_fractions(b["instances"], out.rar_grid)
        frac_clip = token_fractions(b["instances"], out.clip_grid)
        vce = chain_heads(normalize_attention(out.vce[:, list(dcfg.heads)].float(), 0.2), (0, 1))
        # raw q k^T per head (out.vce); softmax with the layer's scale below
        d = pipe.unet.get_submodule(dcfg.vce_layer)
        scale = float(d.scale)
        vce_soft = (out.vce[:, list(dcfg.heads)].float() * scale).softmax(-1).mean(1)
        acr = refine_correlation(out.vce.float(), tuple(dcfg.heads), 0.2, 9, 5, out.clip_grid)
        maps = {"rar": (rar, frac_rar), "vce": (vce, frac_clip), "vce_soft": (vce_soft, frac_clip),
                "vce_acr": (acr, frac_clip)}
        if colour:
            for sig in (0.05, 0.1, 0.2):
                maps[f"colour{sig}_rar"] = (colour_kernel(b["images"], out.rar_grid, sig), frac_rar)
                maps[f"colour{sig}_clip"] = (colour_kernel(b["images"], out.clip_grid, sig), frac_clip)
        for name, (a, fr) in maps.items():
            m, l_, c = grouping(a, fr)
            acc.setdefault(name, []).append((m * c, l_ * c, c))
    pipe.unet.set_attn_processor(procs)
    res = {}
    for name, v in acc.items():
        c = sum(x[2] for x in v)
        res[f"{name}_mass"] = sum(x[0] for x in v) / max(c, 1)
        res[f"{name}_lift"] = sum(x[1] for x in v) / max(c, 1)
    return res


# ------------------------------------------------------------------------------------------- train
def build_parser() -> argparse.ArgumentParser:
    """The recipe's settings (its defaults are the shipped model's)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500, help="UNet steps")
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--patch", type=int, default=8, help="CLIP patch size (grid of the VCE map)")
    ap.add_argument("--unet-channels", default="32,32,64,64")
    ap.add_argument("--unet-heads", default="4,4,8,8")
    ap.add_argument("--text-width", type=int, default=32)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-count", type=int, default=128)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--group-steps", type=int, default=600,
                    help="phase 3: steps of epsilon loss + the grouping objective (diclip.toy.grouping_objective)")
    ap.add_argument("--group-weight", type=float, default=1.0, help="weight of the grouping loss in phase 3")
    ap.add_argument("--group-tmax", type=int, default=300,
                    help="the grouping loss applies to samples noised at t < this (the method reads t = 101)")
    ap.add_argument("--group-lr", type=float, default=3e-4)
    ap.add_argument("--init-from", default=None,
                    help="start phase 3 from a released diffusers folder (phases 1-2 skipped) instead of training them")
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    comps = build_components(args, args.seed)
    log = MetricsLog(args.out)
    with open(os.path.join(args.out, "args.json"), "w") as f:  # the settings of the latest (resumed) run
        json.dump(vars(args), f, indent=1)
    if args.init_from:
        pipe = load_release(comps, args.init_from)
    else:
        pipe = train_base(args, comps, log)
    if args.group_steps:
        from diclip.toy.pretrain_grouping import train_grouping

        train_grouping(pipe, args, log)
    export(pipe, args.out)
    plot_metrics(args.out, [("vae", ["rec"]), ("train", ["loss"]), ("group", ["group_loss"]),
                            ("eval", ["rar_lift", "vce_lift", "vce_soft_lift", "colour0.1_rar_lift", "colour0.1_clip_lift"])],
                 "toy diffusion")


def load_release(comps: dict, folder: str):
    """The pipeline with a released folder's weights (fp16 on disk, fp32 here), VAE frozen: phase 3's
    start when phases 1-2 are not run again (``--init-from``)."""
    from safetensors.torch import load_file

    for name, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        comps[name].load_state_dict(load_file(os.path.join(folder, name, f"{file}.safetensors")))
    with open(os.path.join(folder, "vae", "config.json")) as f:
        comps["vae"].register_to_config(scaling_factor=float(json.load(f)["scaling_factor"]))
    comps["vae"].eval().requires_grad_(False)
    print(f"phases 1-2 loaded from {folder}", flush=True)
    return make_pipe(comps)


def log_eval(pipe, args, log: MetricsLog, at: int, label: str, colour: bool = False) -> dict:
    """One grouping evaluation, logged (kind ``eval``) and printed; leaves the models in train mode."""
    t = time.time()
    res = evaluate(pipe, args, args.eval_count, colour=colour)
    log.write("eval", at, unet_step=at - args.vae_steps, **res)
    print(f"[eval {label}] " + " ".join(f"{k}={v:.3f}" for k, v in res.items()) + f" ({time.time() - t:.0f}s)",
          flush=True)
    pipe.unet.train(); pipe.text_encoder.train()  # noqa: E702
    return res


class BaseTraining:
    """Phases 1 and 2 with their optimizers and step counters (``vstep``: VAE, ``step``: UNet), one
    checkpoint for both, so a run resumes in either phase."""

    def __init__(self, args, comps: dict, log: MetricsLog):
        self.args, self.comps, self.log = args, comps, log
        self.wcfg = world.WorldConfig(size=args.size)
        self.vae_opt = torch.optim.AdamW(comps["vae"].parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.params = list(comps["unet"].parameters()) + list(comps["text_encoder"].parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.01)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            warmup_cosine(args.steps, args.warmup))
        self.vstep, self.step = 0, 0

    def resume(self) -> None:
        c = self.comps
        ck = latest_checkpoint(self.args.out)
        if not ck:
            return
        st = torch.load(ck, map_location="cpu", weights_only=True)
        for key, module in (("vae", c["vae"]), ("unet", c["unet"]), ("te", c["text_encoder"]),
                            ("vae_opt", self.vae_opt), ("opt", self.opt), ("sched", self.lr_sched)):
            module.load_state_dict(st[key])
        self.vstep, self.step = int(st["vstep"]), int(st["step"])
        c["vae"].register_to_config(scaling_factor=float(st["scaling_factor"]))
        self.log.truncate_after(self.vstep + self.step)
        print(f"resumed from {ck}: vae step {self.vstep}, unet step {self.step}", flush=True)

    def save(self) -> None:
        c = self.comps
        save_checkpoint(self.args.out, self.vstep + self.step, {
            "vae": c["vae"].state_dict(), "unet": c["unet"].state_dict(), "te": c["text_encoder"].state_dict(),
            "vae_opt": self.vae_opt.state_dict(), "opt": self.opt.state_dict(), "sched": self.lr_sched.state_dict(),
            "vstep": self.vstep, "step": self.step, "scaling_factor": float(c["vae"].config.scaling_factor)})

    def train_vae(self) -> None:
        """Phase 1: reconstruction + a little KL; the latent scaling factor is measured at the end."""
        args, vae = self.args, self.comps["vae"]
        vae.train()
        tl = time.time()
        while self.vstep < args.vae_steps:
            l_rec, l_kl = vae_losses(vae, args, self.vstep, self.wcfg)
            loss = l_rec + 1e-3 * l_kl
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vstep += 1
            if self.vstep % args.log_every == 0:
                dt = (time.time() - tl) / args.log_every
                tl = time.time()
                self.log.write("vae", self.vstep, rec=l_rec.item(), kl=l_kl.item(), s_per_step=dt)
                print(f"vae {self.vstep} rec {l_rec.item():.5f} kl {l_kl.item():.4f} {dt:.2f}s/step", flush=True)
            if self.vstep == args.vae_steps:
                set_scaling_factor(vae, args, self.wcfg, self.log, self.vstep)
            if self.vstep % args.ckpt_every == 0 or self.vstep == args.vae_steps:
                self.save()
        vae.eval().requires_grad_(False)

    def train_unet(self, pipe) -> None:
        """Phase 2: UNet + text encoder on the epsilon loss, evaluated every ``eval_every`` steps."""
        args = self.args
        self.comps["unet"].train()
        self.comps["text_encoder"].train()
        tl = time.time()
        while self.step < args.steps:
            loss = epsilon_loss(self.comps, args, self.step, self.wcfg)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.lr_sched.step()
            self.step += 1
            if self.step % args.log_every == 0:
                dt = (time.time() - tl) / args.log_every
                tl = time.time()
                self.log.write("train", self.vstep + self.step, unet_step=self.step, loss=loss.item(),
                               lr=self.lr_sched.get_last_lr()[0], s_per_step=dt)
                print(f"unet {self.step} loss {loss.item():.4f} {dt:.2f}s/step", flush=True)
            if self.step % args.ckpt_every == 0 or self.step == args.steps:
                self.save()
            if self.step % args.eval_every == 0 or self.step == args.steps:
                log_eval(pipe, args, self.log, self.vstep + self.step, f"unet step {self.step}",
                         self.step == args.steps)


def train_base(args, comps: dict, log: MetricsLog):
    """Phases 1 (VAE) and 2 (UNet + text encoder on the epsilon loss), resumable; returns the pipeline."""
    run = BaseTraining(args, comps, log)
    run.resume()
    print("params: unet %.2fM vae %.2fM text %.2fM" % tuple(sum(p.numel() for p in comps[m].parameters()) / 1e6
                                                           for m in ("unet", "vae", "text_encoder")), flush=True)
    run.train_vae()
    pipe = make_pipe(comps)
    if run.step == 0:
        log_eval(pipe, args, log, run.vstep, f"unet step {run.step}", True)  # untrained UNet + colour reference
    run.train_unet(pipe)
    return pipe


def export(pipe, out: str) -> str:
    """diffusers folder with fp16 weights (build_diffusion loads it as fp32 on CPU)."""
    import copy

    path = os.path.join(out, "pipeline")
    p16 = copy.deepcopy(pipe)
    for m in (p16.unet, p16.vae, p16.text_encoder):
        m.to(torch.float16)
    p16.save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    main()
