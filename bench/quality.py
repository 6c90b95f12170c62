"""The paper's ablation in miniature, on the shipped toy models and the toy world, in one run.

    .venv/bin/python bench/quality.py [--quick] [--out bench/results/quality]

Every row runs the real pipeline stages (Ray Data, Ray Train + DeepSpeed, the evaluate stage) on the
same data, seeds and models; rows share what they do not change (the dataset, the generated images,
masks, cache and maps) and recompute the rest:

* ``CLIP Surgery``: no VCE (``method.vce=false``), no TSA (``method.retrieval_weight=0
  method.adapter_cam_weight=0``): surgery CAMs + CAA + RAR.
* ``+ VCE``, ``+ TSA``, ``DiCLIP`` (both): the method's two additions, alone and together.
* controls: ``all background``; ``untrained diffusion`` (the shipped VAE with a re-initialised UNet and
  text encoder: what attention gives without diffusion training); ``colour kernel`` (CAM only: the
  DiCLIP row's trained model with a parameter-free colour affinity ``exp(-|rgb_i - rgb_j|^2 / 2 s^2)``
  in place of both diffusion maps, through the evaluate stage's own CAM code).
* maps: stored whole-image maps (the rows above), the per-crop bank (``correlate.crops_per_image``),
  online per-step maps (``train.mode=online``).

CAM mIoU is the pseudo-label quality on the train split (the evaluate stage's ``cam`` task, reference
protocol); segmentation mIoU is the trained segmenter on the val split. Writes ``<out>/quality.md``
(table), ``<out>/quality.json`` and ``<out>/pictures_<row>.png`` (image | ground truth | CAM |
prediction). Last line: ``DiCLIP CAM X / seg Y; CLIP Surgery CAM X / seg Y; all-background Z``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diclip  # noqa: F401,E402
from diclip import storage  # noqa: E402
from diclip.config import load_spec  # noqa: E402

NO_TSA = ["method.retrieval_weight=0", "method.adapter_cam_weight=0"]
NO_VCE = ["method.vce=false"]


def base_overrides(quick: bool) -> list[str]:
    if quick:  # a smoke run of the bench itself (minutes), not a measurement
        return ["ray.progress_bars=false", "synthesize.num_train=16", "synthesize.num_val=8",
                "generate.images_per_class=2", "generate.num_inference_steps=4", "train.max_iters=10",
                "train.eval_every=10", "train.val_limit=8", "evaluate.num_pictures=4"]
    return ["ray.progress_bars=false", "synthesize.num_train=64", "synthesize.num_val=32",
            "train.max_iters=150", "train.eval_every=150", "train.val_limit=32", "evaluate.num_pictures=6"]


def shared(root: str, *stages: str) -> list[str]:
    """Point the named upstream artifacts at the shared run under ``root``."""
    uris = {"data": f"data.root={root}/data", "generate": f"generate.output={root}/generate",
            "mask": f"mask.output={root}/mask", "cache": f"cache.output={root}/cache",
            "correlate": f"correlate.output={root}/correlate"}
    return [uris[s] for s in stages]


def rows(out: str, untrained: str) -> list[tuple[str, list[str], list[str]]]:
    """(row name, stages it runs, overrides) - the first row builds everything the others share."""
    base = f"{out}/runs/diclip"
    tail = ["train", "evaluate"]
    return [
        ("DiCLIP", ["synthesize", "generate", "mask", "cache", "correlate", *tail], []),
        ("+ VCE (no TSA)", tail, shared(base, "data", "generate", "mask", "cache", "correlate") + NO_TSA),
        ("+ TSA (no VCE)", ["mask", "cache", *tail], shared(base, "data", "generate", "correlate") + NO_VCE),
        ("CLIP Surgery", ["mask", "cache", *tail],
         shared(base, "data", "generate", "correlate") + NO_VCE + NO_TSA),
        ("untrained diffusion", ["mask", "cache", "correlate", *tail],
         shared(base, "data", "generate") + [f"model.diffusion.source={untrained}"]),
        ("per-crop bank (K=4)", ["correlate", *tail],
         shared(base, "data", "generate", "mask", "cache") + ["correlate.crops_per_image=4",
                                                              f"evaluate.correlation={base}/correlate"]),
        ("online maps", tail, shared(base, "data", "generate", "mask", "cache", "correlate") + ["train.mode=online"]),
    ]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def make_untrained(path: str) -> str:
    """The shipped diffusion folder with its UNet and text encoder re-initialised (seeded), VAE kept."""
    if os.path.isdir(path):
        return path
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from diclip.models.diffusion import build_diffusion

    pipe = build_diffusion("diclip:toy/diffusion")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config)
        pipe.text_encoder = CLIPTextModel(pipe.text_encoder.config)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def all_background(spec, split: str) -> float:
    from diclip.data.datasets import open_split
    from diclip.method import metrics

    ds = open_split(spec.data, split)
    k = ds.class_set.num_classes
    cm = sum(metrics.confusion_matrix(m, np.zeros_like(m), k) for m in (ds.read_mask(i) for i in ds.ids))
    return float(metrics.summarize(cm, ds.class_set.classes)["miou"])


def colour_affinity(images: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Row-normalised ``exp(-|rgb_i - rgb_j|^2 / 2 sigma^2)`` between grid cells: [B, N, N]."""
    import torch.nn.functional as F

    c = F.adaptive_avg_pool2d(images.float(), grid).flatten(2).transpose(1, 2)  # [B, N, 3] in [0, 1]
    k = torch.exp(-torch.cdist(c, c).pow(2) / (2 * sigma ** 2))
    return k / k.sum(-1, keepdim=True)


def colour_cam_miou(spec, sigma: float = 0.1) -> float:
    """CAM mIoU of the DiCLIP row's model on the CAM split with colour affinities for VCE and RAR."""
    from diclip.data.datasets import open_split
    from diclip.inference import cam_pseudo_labels, load_exported_model, resize_square
    from diclip.method import metrics
    from diclip.method.pseudo import rar_transition_from_mean

    model, mspec, card = load_exported_model(spec.evaluate.checkpoint, "cpu", dataset=spec.data.dataset)
    size = int(card.get("crop_size") or mspec.data.crop_size)
    patch = model.encoder.patch
    clip_grid = (size // patch, size // patch)
    rar_grid = (size // 2, size // 2)  # the toy VAE downsamples x2: the RAR layer's grid at this size
    ds = open_split(spec.data, spec.evaluate.cam_split)
    k = ds.class_set.num_classes
    cm = np.zeros((k, k), np.int64)
    for start in range(0, len(ds.ids), 16):
        samples = [ds.load(i) for i in ds.ids[start:start + 16]]
        images = torch.stack([resize_square(s.image, size, "cpu") for s in samples])
        labels = torch.from_numpy(np.stack([s.label for s in samples])).float()
        corr = colour_affinity(images, clip_grid, sigma)
        rar = rar_transition_from_mean(colour_affinity(images, rar_grid, sigma))
        res = cam_pseudo_labels(model, images, labels, corr, rar, rar_grid, [s.image.shape[:2] for s in samples],
                                caa_threshold=spec.evaluate.cam_caa_threshold, rar_steps=spec.evaluate.cam_rar_steps,
                                use_adapter_cam=spec.evaluate.cam_adapter)
        for s, r in zip(samples, res):
            cm += metrics.confusion_matrix(s.mask, r.label, k)
    return float(metrics.summarize(cm, ds.class_set.classes)["miou"])


def run_row(out: str, name: str, stages: list[str], overrides: list[str], common: list[str]) -> dict:
    from ray_jobs.pipeline import run_pipeline

    root = f"{out}/runs/{slug(name)}"
    spec = load_spec("configs/demo.yaml", [f"output_uri={root}", *common, *overrides,
                                           f"pipeline.stages=[{','.join(stages)}]"])
    t = time.perf_counter()
    run_pipeline(spec)
    ev = storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
    pic = storage.join(spec.evaluate.output, "pictures.png")
    if storage.exists(pic):
        shutil.copy(storage.local_path(pic), os.path.join(out, f"pictures_{slug(name)}.png"))
    return {"row": name, "cam_miou": ev["cam"]["miou"], "seg_miou": ev["segmentation"]["miou"],
            "seconds": round(time.perf_counter() - t, 1), "overrides": overrides, "spec": spec}


def table(results: list[dict]) -> str:
    lines = ["| row | CAM mIoU (train) | seg mIoU (val) | seconds |", "|---|---:|---:|---:|"]
    for r in results:
        cam = "-" if r["cam_miou"] is None else f"{100 * r['cam_miou']:.1f}"
        seg = "-" if r["seg_miou"] is None else f"{100 * r['seg_miou']:.1f}"
        lines.append(f"| {r['row']} | {cam} | {seg} | {r.get('seconds', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs, measures nothing")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    from ray_jobs.common import init_ray

    common = base_overrides(a.quick)
    init_ray(load_spec("configs/demo.yaml", [f"output_uri={out}/runs/diclip", *common]))
    untrained = make_untrained(os.path.join(out, "untrained_diffusion"))
    wanted = {w.strip() for w in a.rows.split(",") if w.strip()}
    results = []
    for name, stages, overrides in rows(out, untrained):
        if wanted and name not in wanted and name != "DiCLIP":
            continue
        r = run_row(out, name, stages, overrides, common)
        print(f"{name:<24} CAM {r['cam_miou']:.3f}  seg {r['seg_miou']:.3f}  ({r['seconds']:.0f} s)", flush=True)
        results.append(r)
    spec = results[0]["spec"]
    results.append({"row": "colour kernel (CAM only)", "cam_miou": colour_cam_miou(spec), "seg_miou": None})
    bg = {"row": "all background", "cam_miou": all_background(spec, spec.evaluate.cam_split),
          "seg_miou": all_background(spec, spec.evaluate.split)}
    results.append(bg)
    md = ["# DiCLIP ablation on the toy world", "",
          "Shipped toy CLIP + diffusion models (diclip/resources/toy), `configs/demo.yaml` with "
          f"`{' '.join(common)}`; one run of `bench/quality.py`{' --quick' if a.quick else ''}.", "",
          table(results), ""]
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "spec"} for r in results], f, indent=1)
    print("\n".join(md))
    by = {r["row"]: r for r in results}
    d, s = by["DiCLIP"], by.get("CLIP Surgery", {"cam_miou": float("nan"), "seg_miou": float("nan")})
    print(f"DiCLIP CAM {d['cam_miou']:.3f} / seg {d['seg_miou']:.3f}; CLIP Surgery CAM {s['cam_miou']:.3f} / "
          f"seg {s['seg_miou']:.3f}; all-background {bg['cam_miou']:.3f}")


if __name__ == "__main__":
    main()
