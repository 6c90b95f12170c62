"""Per-crop map fidelity: what the training step sees under three ways of getting the diffusion maps.

For the same training images, the same bank crops (geometry from the training sampler), the same models:

(a) ``whole``  - the image's whole-image maps (``correlate`` without a bank) resampled to the crop;
(b) ``bank``   - the per-crop bank's maps (``correlate.crops_per_image``), extracted on the crop itself;
(c) ``online`` - the reference's behaviour: the diffusion pass on the crop in the step, here with the
                 noise draw the bank used, so (b) vs (c) isolates storage and (a) vs (c) resampling;
(c') ``online2`` - (c) with another noise draw: what the reference itself varies by from step to step
                 (it draws fresh noise each time), the floor any map is measured against.

Reported: pseudo-label pixel agreement of each with (c), and CAM (pseudo-label) mIoU against the crop's
ground truth. Plus bytes per map and per image, and object-store totals of the bank for VOC (K=8) and
COCO (K=5) for every RAR codec, at the SD 2.1 geometry (320 px crop: 20x20 CLIP tokens, 40x40 RAR tokens,
head dim 64); ``bench/correlation_storage.py`` measures each codec's pseudo-label agreement.

``--models demo`` (tiny random models of ``configs/tiny.yaml``, default), ``--models fullsize`` (random-init ViT-B/16 + SD 2.1-base
topology from ``bench/fullsize_check.py``), ``--models toy`` (the shipped toy models of ``configs/demo.yaml``).
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
from _common import RESULTS, write_result

VOC_IMAGES, VOC_K = 10582, 8
COCO_IMAGES, COCO_K = 82783, 5


def spec_for(models: str, root: str, images: int, crops: int):
    from diclip.config import load_spec

    base = [f"output_uri={root}", "ray.progress_bars=false", f"correlate.crops_per_image={crops}",
            f"synthesize.num_train={images}", "synthesize.num_val=2", "train.seed=0"]
    if models == "demo":
        return load_spec("configs/tiny.yaml", base + ["synthesize.image_size=[96,128]", "correlate.max_side=128"])
    if models == "fullsize":
        wt = RESULTS / "fullsize"
        clip, sd = wt / "vit-b-16-quickgelu-random.safetensors", wt / "sd21-base-topology-random"
        if not clip.exists() or not (sd / "model_index.json").exists():
            raise SystemExit("run bench/fullsize_check.py first (it builds the full-size random-init models)")
        return load_spec("configs/tiny.yaml", base + [
            "model.clip.name=ViT-B-16", f"model.clip.pretrained={clip}", "model.clip.quick_gelu=true",
            f"model.diffusion.source={sd}", "data.crop_size=320", "data.rescale_range=[0.5,2.0]",
            "synthesize.image_size=[320,400]", "correlate.max_side=400", "model.adapter_size=312",
            "model.embedding_dim=256", "model.decoder_layers=3", "model.decoder_heads=8",
            "correlate.resources={num_cpus: 1, concurrency: 1, batch_size: 2}"])
    if models == "toy":
        return load_spec("configs/demo.yaml", base)  # the demo spec points at the shipped toy models
    raise SystemExit(f"unknown --models {models!r}")


def miou(gt: np.ndarray, pred: np.ndarray, k: int) -> float:
    from diclip.method.metrics import confusion_matrix, summarize

    cm = sum(confusion_matrix(g, p, k) for g, p in zip(gt, pred))
    return float(summarize(cm, [str(i) for i in range(k)])["miou"])


def measure(spec, crops: int) -> dict:
    import torch

    from diclip.data import get_class_set, open_dataset
    from diclip.data.map_shards import CorrelationStore, batch_maps
    from diclip.data.crop_bank import bank_geometry, crop_item_id
    from diclip.data.transforms import apply_geometry
    from diclip.models.diffusion_maps import noise_seed, rar_mean, vce_compact
    from diclip.method.pseudo import rar_transition_from_mean
    from diclip.models.kv_cache import save_cache
    from diclip.train.trainer import DiCLIPTrainer
    from ray_jobs.stages import correlate, synthesize
    from tests.helpers import random_cache

    synthesize.run(spec)
    correlate.run(spec)
    cs = get_class_set(spec.data.dataset)
    import open_clip

    from diclip.models.clip import register_bundled_configs

    register_bundled_configs()
    dim = (open_clip.get_model_config(spec.model.clip.name) or {}).get("embed_dim", 512)
    save_cache(spec.train.cache, random_cache(dim, list(cs.classes)))
    trainer = DiCLIPTrainer(spec, "cpu", with_diffusion=True)
    trainer.model.eval()
    store = CorrelationStore(spec.correlate.output)
    ds = open_dataset(spec.data.root, spec.data.train_split, cs)
    d, crop = spec.data, spec.data.crop_size
    labels = {m: [] for m in ("whole", "bank", "online", "online2")}
    gts = []
    patch = trainer.patch
    for item in ds.ids:
        s = ds.load(item)
        for k in range(crops):
            geom = bank_geometry(item, k, s.image.shape[:2], crop, tuple(d.rescale_range), d.flip,
                                 spec.correlate.crop_seed)
            x = torch.from_numpy(apply_geometry(s.image, geom)).permute(2, 0, 1)[None].float() / 255
            gts.append(apply_geometry(s.mask, geom, is_mask=True, fill=255))
            lab = torch.from_numpy(s.label[None]).float()
            grid = (crop // patch, crop // patch)
            maps = {}
            whole = store.get([item])[0]
            ratio = whole.rar_grid[0] // whole.grid[0]
            rgrid = (grid[0] * ratio, grid[1] * ratio)
            v, r = batch_maps([whole], [geom], grid, rgrid)
            maps["whole"] = (v, rar_transition_from_mean(r), rgrid)
            bank = store.get([crop_item_id(item, k)])[0]
            v, r = batch_maps([bank], None, None, None)
            maps["bank"] = (v, rar_transition_from_mean(r), bank.rar_grid)
            for name, key in (("online", crop_item_id(item, k)), ("online2", f"{item}:{k}:again")):
                cap = trainer.diffusion(x, [noise_seed(key, spec.model.diffusion.seed)])
                comp = vce_compact(cap, spec.method, spec.model.diffusion)
                maps[name] = (comp.expand(), rar_transition_from_mean(rar_mean(cap)), cap.rar_grid)
            for name, (v, r, rg) in maps.items():
                out = trainer.model(x, v.float())
                _, pl = trainer.model.pseudo_labels(out, r.float(), lab, (crop, crop), gate=False, rar_grid=rg)
                labels[name].append(pl[0].numpy())
    k_cls = cs.num_classes
    res: dict = {"crops": len(gts)}
    for name in labels:
        agree = np.mean([(a == b).mean() for a, b in zip(labels[name], labels["online"])])
        res[name] = {"agreement_with_online": float(agree), "cam_miou": miou(gts, labels[name], k_cls)}
    return res


def bank_bytes() -> dict:
    """Bytes per bank map at the SD 2.1 geometry per codec, and the object-store totals."""
    import torch

    from diclip.method.codecs import RAR_CODECS, get_codec, nbytes

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1600, 64, generator=g), torch.randn(2, 1600, 64, generator=g)
    vce = 400 + 16 * 400 * 2  # uint8 ids + ~16 fp16 cluster rows on the 20x20 grid
    out = {}
    for name in RAR_CODECS:
        per_map = vce + nbytes(get_codec(name).encode(q, k, 0.125))
        out[name] = {"bytes_per_map": per_map, "voc_bytes_per_image": per_map * VOC_K,
                     "coco_bytes_per_image": per_map * COCO_K,
                     "voc_total_gb": per_map * VOC_IMAGES * VOC_K / 1e9,
                     "coco_total_gb": per_map * COCO_IMAGES * COCO_K / 1e9}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="demo", choices=("demo", "fullsize", "toy"))
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--crops", type=int, default=2)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="diclip-cropfid-")
    spec = spec_for(args.models, root, args.images, args.crops)
    res = measure(spec, args.crops)
    sizes = bank_bytes()
    print(f"{res['crops']} crops ({args.images} images x {args.crops}), {args.models} models:")
    for name in ("whole", "bank", "online2", "online"):
        r = res[name]
        print(f"  {name:<8} pseudo-label agreement with online {100 * r['agreement_with_online']:6.2f}%   "
              f"CAM mIoU {r['cam_miou']:.3f}")
    for name, s in sizes.items():
        print(f"  bank {name}: {s['bytes_per_map'] / 1e3:.0f} kB per map; VOC K={VOC_K}: "
              f"{s['voc_bytes_per_image'] / 1e6:.1f} MB per image, {s['voc_total_gb']:.0f} GB; COCO K={COCO_K}: "
              f"{s['coco_bytes_per_image'] / 1e6:.1f} MB per image, {s['coco_total_gb']:.0f} GB")
    write_result(f"crop_fidelity_{args.models}", {"models": args.models, "fidelity": res, "bank_bytes": sizes})
    b, w, o2 = (res[n]["agreement_with_online"] for n in ("bank", "whole", "online2"))
    print(f"agreement with online maps: bank {100 * b:.2f}% vs whole-image {100 * w:.2f}% "
          f"(noise floor {100 * o2:.2f}%)")


if __name__ == "__main__":
    main()
