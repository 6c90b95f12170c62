"""Score shipped toy models through the pipeline's own code, against untrained and trivial baselines.

    python -m diclip.toy.evaluate --clip /work/toy_runs/v2/final/clip \
        --diffusion /work/toy_runs/v2/final/diffusion_pipeline --out /work/toy_runs/v2/final/eval.json

Three blocks (held-out world-v2 samples, ``VAL_OFFSET`` onwards, GT image labels everywhere):

* ``clip``: :func:`diclip.toy.pretrain_clip.evaluate` (zero-shot mAP, pointing game, surgery-CAM mIoU at
  bg threshold 0.5 per surgery depth) for the trained CLIP and for its untrained init, plus the
  all-background mIoU;
* ``unet``: :func:`diclip.toy.pretrain_diffusion.evaluate` (object-grouping lift of the RAR map, the VCE
  map - raw chain, softmax, ACR-refined - and colour kernels) for the trained diffusion model and
  for an untrained UNet + text encoder on the same VAE;
* ``end_to_end``: the method's CAM path - ``DiCLIP`` forward (surgery + cache-retrieval CAM) with
  the VCE correlation ``corr`` off (CLIP Surgery), from the trained UNet, from the untrained UNet and
  an oracle (GT co-membership, row-normalised), then CAA + RAR pseudo-labels
  (``diclip.inference.cam_pseudo_labels``, RAR always from the trained UNet). The KV cache is built
  the way the ``cache`` stage does (mean CAM-space feature inside/outside the mask of single-class
  training images, k-means per class) with the same ``corr`` setting as the arm.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

from diclip.toy.common import one_thread

one_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import diclip  # noqa: F401,E402

from diclip.data import toy_world as world  # noqa: E402

VAL_OFFSET = 10_000_000


# ------------------------------------------------------------------------------------------- loading
def load_clip(path: str, untrained: bool = False, seed: int = 0):
    """(model, tokenizer, name, cfg) from a folder with ``<name>.json`` + ``toy_clip.safetensors``;
    ``untrained``: the same architecture at its seeded init (the training run's step 0)."""
    from diclip.toy.pretrain_clip import build_model

    cfgs = [p for p in glob.glob(os.path.join(path, "*.json")) if not p.endswith(("card.json", "args.json"))]
    if len(cfgs) != 1:
        raise FileNotFoundError(f"expected one open_clip config json in {path}, found {cfgs}")
    model, tok, name, cfg = build_model(cfgs[0], None, seed)
    if not untrained:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(os.path.join(path, "toy_clip.safetensors")).items()})
    return model.eval().requires_grad_(False), tok, name, cfg


def load_diffusion(path: str, untrained: bool = False, seed: int = 0):
    """The shipped pipeline (``build_diffusion``); ``untrained``: its UNet and text encoder re-initialised
    (seeded), VAE kept."""
    from diclip.models.diffusion import build_diffusion

    pipe = build_diffusion(path)
    if untrained:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config).eval().requires_grad_(False)
            pipe.text_encoder = CLIPTextModel(pipe.text_encoder.config).eval().requires_grad_(False)
    return pipe


# ------------------------------------------------------------------------------------------- end to end
def _diclip(model, tok, name: str, surgery_blocks: int, cache):
    from diclip.config import ClipConfig, MethodConfig, ModelConfig
    from diclip.models.clip import ClipBundle
    from diclip.models.diclip_model import DiCLIP

    mcfg = ModelConfig(clip=ClipConfig(name=name, pretrained="", prompt_template=world.PROMPT_TEMPLATE,
                                       surgery_blocks=surgery_blocks),
                       adapter_size=max(64, cache.num_entries))
    torch.manual_seed(0)
    return DiCLIP(ClipBundle(model, tok, f"{name}/toy"), world.TOY, cache, mcfg, MethodConfig()).eval()


class Maps:
    """Diffusion maps of a batch: VCE (ACR-refined, compact -> dense) and the RAR transition."""

    def __init__(self, pipe, patch: int):
        from diclip.config import DiffusionConfig, MethodConfig
        from diclip.models.attention_capture import DiffusionAttention

        self.dcfg = DiffusionConfig(source="toy")
        self.method = MethodConfig()
        self.cap = DiffusionAttention(pipe, self.dcfg, patch)

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor, ids: list[str]):
        from diclip.method.pseudo import rar_transition_from_mean
        from diclip.models.diffusion_maps import noise_seed, rar_mean, vce_compact

        cap = self.cap(images01, [noise_seed(i, self.dcfg.seed) for i in ids])
        corr = vce_compact(cap, self.method, self.dcfg).expand().float()
        return corr, rar_transition_from_mean(rar_mean(cap).float()), cap.rar_grid


def oracle_corr(instances: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Row-normalised co-membership of tokens by majority instance (0 = background): [B, N, N]."""
    x = torch.from_numpy(instances.astype(np.int64))
    k = int(x.max()) + 1
    frac = F.adaptive_avg_pool2d(F.one_hot(x, k).permute(0, 3, 1, 2).float(), grid).flatten(2)  # [B, K, N]
    lab = frac.argmax(1)  # [B, N]
    same = (lab[:, :, None] == lab[:, None, :]).float()
    return same / same.sum(-1, keepdim=True)


@torch.no_grad()
def build_cache(enc, mean, std, corr_fn, *, seed: int, count: int, per_class: int = 10, background: int = 25):
    """KV cache like the ``cache`` stage, from single-class training images of world ``seed``."""
    from diclip.method.kmeans import kmeans
    from diclip.models.kv_cache import KVCache

    groups: dict[int, list] = {}
    idx, got = 0, 0
    while got < count:
        b = world.batch(seed, 5_000_000 + idx, 64)
        idx += 64
        keep = np.nonzero(b["labels"].sum(1) == 1)[0]
        if len(keep) == 0:
            continue
        imgs = world.to_tensor(b["images"][keep], normalise=False)
        corr = corr_fn(imgs, [f"cache{5_000_000 + idx - 64 + int(i)}" for i in keep], b["instances"][keep])
        out = enc((imgs - mean) / std, corr)
        f = out.features.float()
        f = (f / f.norm(dim=1, keepdim=True))[:, 1:]
        inside = F.interpolate(torch.from_numpy((b["masks"][keep] > 0).astype(np.float32))[:, None], size=out.grid,
                               mode="nearest").flatten(1) > 0
        for j, i in enumerate(keep):
            cls = int(np.nonzero(b["labels"][i])[0][0]) + 1
            if inside[j].any():
                groups.setdefault(cls, []).append(f[j][inside[j]].mean(0).numpy())
            if (~inside[j]).any():
                groups.setdefault(0, []).append(f[j][~inside[j]].mean(0).numpy())
        got += len(keep)
    keys, ids = [], []
    for g in sorted(groups):
        c, _ = kmeans(np.stack(groups[g]), background if g == 0 else per_class, seed=g)
        keys.append(c)
        ids += [g] * len(c)
    keys = torch.from_numpy(np.concatenate(keys))
    values = F.one_hot(torch.tensor(ids), len(world.CLASSES)).float()
    return KVCache(keys, values, {"classes": list(world.CLASSES), "images": got})


@torch.no_grad()
def end_to_end(clip_model, tok, name: str, pipe, untrained_pipe, *, patch: int, count: int, surgery_blocks: int,
               cache_images: int = 300, seed: int = 0, batch: int = 32) -> dict:
    from diclip.inference import cam_pseudo_labels
    from diclip.method.metrics import confusion_matrix, iou_per_class
    from diclip.models.vce import VCEVisionEncoder

    maps = Maps(pipe, patch)
    maps_u = Maps(untrained_pipe, patch) if untrained_pipe is not None else None
    method = maps.method
    enc = VCEVisionEncoder(clip_model.visual, surgery_blocks)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    grid = (world.WorldConfig().size // patch,) * 2

    arms = {
        "off": lambda im, ids, inst: None,
        "vce_trained": lambda im, ids, inst: maps(im, ids)[0],
        "oracle": lambda im, ids, inst: oracle_corr(inst, grid),
    }
    if maps_u is not None:
        arms["vce_untrained"] = lambda im, ids, inst: maps_u(im, ids)[0]
    ncls = len(world.CLASSES)
    res = {}
    for arm, corr_fn in arms.items():
        t = time.time()
        cache = build_cache(enc, mean, std, corr_fn, seed=seed, count=cache_images)
        model = _diclip(clip_model, tok, name, surgery_blocks, cache)
        cm_pl = np.zeros((ncls, ncls), np.int64)
        cm_cam = np.zeros((ncls, ncls), np.int64)
        cm_sur = np.zeros((ncls, ncls), np.int64)
        for start in range(0, count, batch):
            n = min(batch, count - start)
            b = world.batch(seed, VAL_OFFSET + start, n)
            ids = [f"val{VAL_OFFSET + start + i}" for i in range(n)]
            imgs = world.to_tensor(b["images"], normalise=False)
            _, rar_trans, rar_grid = maps(imgs, ids)
            corr = corr_fn(imgs, ids, b["instances"])
            labels = torch.from_numpy(b["labels"])
            size = tuple(b["masks"].shape[1:])
            results = cam_pseudo_labels(model, imgs, labels, corr, rar_trans, rar_grid, [size] * n,
                                        caa_threshold=method.caa_threshold, rar_steps=method.rar_steps)
            pl = np.stack([r.label for r in results])
            cm_pl += confusion_matrix(b["masks"], pl, ncls)
            out = model(imgs, corr)
            for cam, cm in ((out.cam, cm_cam), (out.surgery_cam, cm_sur)):
                c = cam.transpose(1, 2).reshape(n, ncls - 1, *out.grid)
                c = F.interpolate(c, size=size, mode="bilinear", align_corners=False) * labels[:, :, None, None]
                pred = torch.cat([torch.full((n, 1, *size), 0.5), c], 1).argmax(1).numpy()
                cm += confusion_matrix(b["masks"], pred, ncls)
        res[arm] = {"pseudo_label_miou": float(np.nanmean(iou_per_class(cm_pl))),
                    "pseudo_label_iou": [round(float(x), 4) for x in iou_per_class(cm_pl)],
                    "cam_miou@0.5": float(np.nanmean(iou_per_class(cm_cam))),
                    "surgery_cam_miou@0.5": float(np.nanmean(iou_per_class(cm_sur))),
                    "cache_entries": cache.num_entries, "seconds": round(time.time() - t, 1)}
        print(arm, json.dumps(res[arm]), flush=True)
    return res


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", required=True, help="folder with toy_clip.safetensors + its open_clip json")
    ap.add_argument("--diffusion", required=True, help="diffusers folder of the toy pipeline")
    ap.add_argument("--out", required=True, help="JSON file for the scores")
    ap.add_argument("--count", type=int, default=512, help="held-out images for the CLIP and UNet blocks")
    ap.add_argument("--e2e-count", type=int, default=256, help="held-out images for the end-to-end block")
    ap.add_argument("--surgery-blocks", type=int, default=3, help="surgery depth of the end-to-end DiCLIP")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--cache-images", type=int, default=300, help="single-class training images for the KV cache")
    ap.add_argument("--blocks", default="clip,unet,e2e")
    a = ap.parse_args(argv)
    blocks = set(a.blocks.split(","))
    res: dict = {"count": a.count, "e2e_count": a.e2e_count, "world": "diclip.data.toy_world defaults, seed 0, "
                 f"indices {VAL_OFFSET}+"}
    if os.path.exists(a.out):
        with open(a.out) as f:
            res.update({k: v for k, v in json.load(f).items() if k in ("clip", "unet", "end_to_end")})
    clip_model, tok, name, _ = load_clip(a.clip)
    if "clip" in blocks:
        from diclip.toy.pretrain_clip import evaluate as clip_eval

        wcfg = world.WorldConfig()
        res["clip"] = {"trained": clip_eval(clip_model, tok, wcfg, seed=0, count=a.count),
                       "untrained": clip_eval(load_clip(a.clip, untrained=True)[0], tok, wcfg, seed=0, count=a.count)}
        print(json.dumps(res["clip"]), flush=True)
    if blocks & {"unet", "e2e"}:
        pipe = load_diffusion(a.diffusion)
        upipe = load_diffusion(a.diffusion, untrained=True)
    if "unet" in blocks:
        from diclip.toy.pretrain_diffusion import evaluate as unet_eval

        ns = argparse.Namespace(patch=a.patch, size=world.WorldConfig().size, seed=0)
        res["unet"] = {"trained": unet_eval(pipe, ns, a.count, colour=True), "untrained": unet_eval(upipe, ns, a.count)}
        print(json.dumps(res["unet"]), flush=True)
    if "e2e" in blocks:
        res["end_to_end"] = end_to_end(clip_model, tok, name, pipe, upipe, patch=a.patch, count=a.e2e_count,
                                       surgery_blocks=a.surgery_blocks, cache_images=a.cache_images)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(a.out)


if __name__ == "__main__":
    main()
