"""Object grouping of *every* self-attention layer of a toy diffusion run, at several noise levels.

    python -m diclip.toy.unet_layers --run /work/toy_runs/unet [--untrained] [--count 128]

For each ``attn1`` layer with a grid of at least 4x4: the lift of its head-mean softmax attention
(mass on the query's own object / the object's token share; 1 = no grouping), as in
``pretrain_diffusion.grouping``; plus the colour-kernel lift on the same grids. Shows which UNet levels
group objects, next to the two the pipeline reads (VCE: up_blocks.1.attentions.2, RAR:
up_blocks.3.attentions.1).
"""
from __future__ import annotations

import argparse
import json
import os

from diclip.toy.common import latest_checkpoint, one_thread

one_thread()

import torch  # noqa: E402

from diclip.method.diffusion_input import diffusion_input  # noqa: E402
from diclip.models.attention_capture import install_capture, layer_grid  # noqa: E402
from diclip.data import toy_world as world  # noqa: E402
from diclip.toy.pretrain_diffusion import (  # noqa: E402
    VAL_OFFSET, build_components, colour_kernel, grouping, make_pipe, token_fractions,
)


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--untrained", action="store_true", help="random UNet + text encoder (the run's VAE)")
    ap.add_argument("--count", type=int, default=128)
    ap.add_argument("--timesteps", default="20,35,45,49", help="indices into the 50 timesteps of the pipeline scheduler (45 = what the method reads)")
    a = ap.parse_args(argv)
    args = argparse.Namespace(**json.load(open(os.path.join(a.run, "args.json"))))
    comps = build_components(args, args.seed)
    st = torch.load(latest_checkpoint(a.run), map_location="cpu", weights_only=True)
    comps["vae"].load_state_dict(st["vae"])
    comps["vae"].register_to_config(scaling_factor=float(st["scaling_factor"]))
    if not a.untrained:
        comps["unet"].load_state_dict(st["unet"])
        comps["text_encoder"].load_state_dict(st["te"])
    pipe = make_pipe(comps)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
    layers = [k[: -len(".processor")] for k in pipe.unet.attn_processors if k.endswith("attn1.processor")]
    store: dict = {}
    install_capture(pipe.unet, layers, store)
    b = world.batch(args.seed, VAL_OFFSET, a.count, world.WorldConfig(size=args.size))
    x = diffusion_input(world.to_tensor(b["images"], normalise=False), pipe.vae.dtype)  # as the method feeds it
    sched = pipe.scheduler
    sched.set_timesteps(50)
    z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids)[0].expand(a.count, -1, -1)
    latent = tuple(z.shape[-2:])
    grids = {}
    print(f"{'layer':45s} grid " + " ".join(f"t={int(sched.timesteps[int(i)]):>4d}" for i in a.timesteps.split(",")))
    rows: dict[str, list] = {}
    for ti in (int(i) for i in a.timesteps.split(",")):
        t = sched.timesteps[ti]
        g = torch.Generator().manual_seed(0)
        noisy = sched.add_noise(z, torch.randn(z.shape, generator=g), t[None])
        store.clear()
        pipe.unet(noisy, t, encoder_hidden_states=emb)
        for name in layers:
            q, k, s = store[name]
            grid = layer_grid(q.shape[2], latent)
            if grid[0] < 4:
                continue
            grids[name] = grid
            att = (q.float() @ k.float().transpose(-1, -2) * s).softmax(-1).mean(1)
            rows.setdefault(name, []).append(grouping(att, token_fractions(b["instances"], grid))[1])
    for name, vals in rows.items():
        mark = " <- VCE" if name.startswith("up_blocks.1.attentions.2") else " <- RAR" if name.startswith("up_blocks.3.attentions.1") else ""
        print(f"{name.split('.transformer_blocks')[0]:45s} {grids[name][0]:>2d}x{grids[name][1]:<2d} "
              + " ".join(f"{v:6.2f}" for v in vals) + mark)
    for grid in sorted(set(grids.values())):
        print(f"{'colour kernel sigma=0.1':45s} {grid[0]:>2d}x{grid[1]:<2d} "
              f"{grouping(colour_kernel(b['images'], grid, 0.1), token_fractions(b['instances'], grid))[1]:6.2f}")


if __name__ == "__main__":
    main()
