"""Picture of the pipeline's surgery CAMs of a toy CLIP on held-out toy-world samples.

    python -m diclip.toy.show_cams --run /work/toy_runs/clip [--surgery-blocks 2] [--count 16]

Rows per sample group: image, GT mask, then the CAM of each present class (GT labels), thresholded
argmax prediction at 0.5. Loads ``toy_clip.safetensors`` if present, else the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os

from diclip.toy.common import one_thread

one_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diclip.method.cam import surgery_cam  # noqa: E402
from diclip.models.vce import VCEVisionEncoder  # noqa: E402
from diclip.data import toy_world as world  # noqa: E402
from diclip.toy.common import latest_checkpoint  # noqa: E402
from diclip.toy.clip_objectives import TEXT_WORDS  # noqa: E402
from diclip.toy.pretrain_clip import DEFAULT_CONFIG, VAL_OFFSET, build_model, encode_words  # noqa: E402


def load_run(run: str):
    with open(os.path.join(run, "args.json")) as f:
        args = json.load(f)
    model, tok, name, cfg = build_model(args.get("config", DEFAULT_CONFIG), args.get("pool"), args.get("seed", 0))
    st = os.path.join(run, "toy_clip.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        sd = {k: v.float() for k, v in load_file(st).items()}
    else:
        sd = torch.load(latest_checkpoint(run), map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(sd)
    return model.eval(), tok, args


@torch.no_grad()
def main(argv=None) -> None:
    from PIL import Image

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--surgery-blocks", type=int, default=2)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    model, tok, args = load_run(a.run)
    wcfg = world.WorldConfig(size=args.get("size", 48))
    b = world.batch(args.get("seed", 0), VAL_OFFSET, a.count, wcfg)
    pix = world.to_tensor(b["images"])
    text = encode_words(model, tok, TEXT_WORDS)
    out = VCEVisionEncoder(model.visual, a.surgery_blocks)(pix)
    f = out.features.float()
    f = f / f.norm(dim=1, keepdim=True)
    nfg = len(world.FG)
    cam = surgery_cam(f, text, nfg).transpose(1, 2).reshape(a.count, nfg, *out.grid)
    s = wcfg.size
    cam = F.interpolate(cam, size=(s, s), mode="bilinear", align_corners=False) * torch.from_numpy(b["labels"])[:, :, None, None]
    pred = torch.cat([torch.full((a.count, 1, s, s), 0.5), cam], 1).argmax(1).numpy()
    pal = world.MASK_COLOURS
    cols = []
    for i in range(a.count):
        tiles = [b["images"][i], pal[b["masks"][i]], pal[pred[i]]]
        for c in range(nfg):
            v = (cam[i, c].numpy() * 255).astype(np.uint8)
            tiles.append(np.stack([v] * 3, -1))
        cols.append(np.concatenate(tiles, 0))
    grid = np.concatenate(cols, 1)
    path = a.out or os.path.join(a.run, f"cams_s{a.surgery_blocks}.png")
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)
    print(path)


if __name__ == "__main__":
    main()
