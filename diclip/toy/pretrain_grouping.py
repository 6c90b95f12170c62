"""Phase 3 of the toy diffusion recipe: epsilon loss + the grouping objective on the read heads.

Run by ``diclip.toy.pretrain_diffusion`` when ``--group-steps`` > 0, after phases 1-2 (or from a released
folder with ``--init-from``). Same data stream as phase 2 (world seed ``seed``, indices continuing
after phase 2's), same epsilon loss and caption dropout; in addition, for samples noised at
``t < --group-tmax``, the VCE and RAR layers' read heads get :func:`grouping_loss` against their
own-instance target (``diclip.toy.grouping_objective``). Own optimizer (``--group-lr``, 50-step
warm-up, cosine), checkpoints in ``<out>/group`` every ``--ckpt-every`` steps, resumable.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from diclip.config import DiffusionConfig
from diclip.data import toy_world as world
from diclip.models.attention_capture import layer_grid
from diclip.toy.common import MetricsLog, latest_checkpoint, save_checkpoint, warmup_cosine
from diclip.toy.grouping_objective import grouping_loss, install_logits, same_instance_target
from diclip.toy.diffusion_objectives import noise_prediction
from diclip.toy.pretrain_diffusion import log_eval  # it imports this module only inside main()


def _step_loss(pipe, args, b: dict, step: int, store: dict, layers: list[str]) -> tuple[torch.Tensor, ...]:
    """(total, epsilon, grouping) losses of one batch."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7_000_000 + step)
    store.clear()  # the capture processors fill it during the UNet pass
    pred, noise, z, t = noise_prediction(pipe.components, args, b, g)
    eps = F.mse_loss(pred, noise)
    inst = torch.from_numpy(b["instances"].astype("int64"))
    near = (t < args.group_tmax).float()
    group = sum(grouping_loss(store[layer], same_instance_target(inst, layer_grid(store[layer].shape[-1], tuple(z.shape[-2:]))), near)
                for layer in layers) / len(layers)
    return eps + args.group_weight * group, eps, group


def train_grouping(pipe, args, log: MetricsLog) -> None:
    """Phase 3 (resumable); leaves ``pipe`` with the trained weights and its default processors."""
    unet, te = pipe.unet, pipe.text_encoder
    out = os.path.join(args.out, "group")
    os.makedirs(out, exist_ok=True)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.group_lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(args.group_steps, 50))
    base = args.vae_steps + args.steps  # phase 3's steps continue the metrics log's step axis
    start = f"{args.init_from or 'phase 2'} at unet step {args.steps}"  # what phase 3 continues from
    gstep = 0
    ck = latest_checkpoint(out)
    st = torch.load(ck, map_location="cpu", weights_only=True) if ck else None
    if st is not None and st.get("start") != start:
        print(f"phase 3 starts over: its checkpoint continued {st.get('start')!r}, this run {start!r}", flush=True)
        st = None
    if st is not None:
        unet.load_state_dict(st["unet"]); te.load_state_dict(st["te"])  # noqa: E702
        opt.load_state_dict(st["opt"]); lr_sched.load_state_dict(st["sched"])  # noqa: E702
        gstep = int(st["gstep"])
        print(f"resumed phase 3 from {ck}: step {gstep}", flush=True)
    log.truncate_after(base + gstep)
    dcfg = DiffusionConfig(source="toy")
    layers = [dcfg.vce_layer, dcfg.rar_layer]
    if gstep == 0:
        log_eval(pipe, args, log, base, "phase 3 start", colour=True)
    store: dict = {}
    before = install_logits(unet, layers, dcfg.heads, store)
    unet.train(); te.train()  # noqa: E702
    wcfg = world.WorldConfig(size=args.size)
    tl = time.time()
    while gstep < args.group_steps:
        b = world.batch(args.seed, (args.steps + gstep) * args.batch, args.batch, wcfg)
        loss, eps, group = _step_loss(pipe, args, b, gstep, store, layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        gstep += 1
        if gstep % args.log_every == 0:
            dt = (time.time() - tl) / args.log_every
            tl = time.time()
            log.write("group", base + gstep, group_step=gstep, loss=eps.item(), group_loss=group.item(),
                      lr=lr_sched.get_last_lr()[0], s_per_step=dt)
            print(f"group {gstep} loss {eps.item():.4f} group {group.item():.4f} {dt:.2f}s/step", flush=True)
        if gstep % args.ckpt_every == 0 or gstep == args.group_steps:
            save_checkpoint(out, gstep, {"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                                         "sched": lr_sched.state_dict(), "gstep": gstep, "start": start})
        if gstep % args.eval_every == 0 or gstep == args.group_steps:
            log_eval(pipe, args, log, base + gstep, f"phase 3 step {gstep}", colour=gstep == args.group_steps)
    unet.set_attn_processor(before)
    unet.eval(); te.eval()  # noqa: E702
