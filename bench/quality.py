"""The paper's ablation in miniature, on the shipped toy models and the toy world, in one run.

    .venv/bin/python bench/quality.py [--quick] [--out bench/results/quality]

Every row runs the real pipeline stages (Ray Data, Ray Train + DeepSpeed, the evaluate stage) on the
same data, seeds and models; rows share what they do not change (the dataset, the generated images,
masks, cache and maps) and recompute the rest:

* ``DiCLIP without RAR``: no random walk on the diffusion attention (``method.rar_steps=0``).
* ``CLIP Surgery``: no VCE (``method.vce=false``), no TSA (``method.retrieval_weight=0
  method.adapter_cam_weight=0``): surgery CAMs + CAA + RAR.
* ``+ VCE``, ``+ TSA``, ``DiCLIP`` (both): the method's two additions, alone and together.
* controls: ``all background``; ``untrained diffusion`` (the shipped VAE with a re-initialised UNet and
  text encoder: what attention gives without diffusion training); ``colour maps`` (training and
  evaluation with the colour affinity below as both VCE and RAR map, written as a correlation store in
  place of the diffusion maps: CAM and segmentation); ``maps: VCE x / RAR y`` (CAM only: the
  DiCLIP row's trained model through the evaluate stage's own CAM code, with the VCE and the RAR map each
  from the stored diffusion maps or from a parameter-free colour affinity ``exp(-|rgb_i - rgb_j|^2 /
  2 s^2)``; ``diffusion / diffusion`` reproduces the DiCLIP row and checks the comparison).
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
from diclip.method.attention_grouping import colour_affinity  # noqa: E402,F401  (the colour-maps control)

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
        ("DiCLIP without RAR", tail, shared(base, "data", "generate", "mask", "cache", "correlate")
         + ["method.rar_steps=0", "evaluate.cam_rar_steps=0"]),
        ("untrained diffusion", ["mask", "cache", "correlate", *tail],
         shared(base, "data", "generate") + [f"model.diffusion.source={untrained}"]),
        ("per-crop bank (K=4)", ["correlate", *tail],
         shared(base, "data", "generate", "mask", "cache") + ["correlate.crops_per_image=4",
                                                              f"evaluate.correlation={base}/correlate"]),
        ("online maps", tail, shared(base, "data", "generate", "mask", "cache", "correlate") + ["train.mode=online"]),
        (COLOUR_ROW, tail, shared(base, "data", "generate", "mask", "cache")),  # its maps: write_colour_maps
    ]


COLOUR_ROW = "colour maps (control)"
COLOUR_SIGMA = 0.1


def write_colour_maps(base_uri: str, out_uri: str, spec, sigma: float = COLOUR_SIGMA) -> int:
    """A correlation store with the items, grids and splits of the diffusion store at ``base_uri`` whose VCE
    and RAR maps are the colour affinity of the same square input: the control row trains and evaluates
    on it through the real stages. VCE in compact form with one cluster per token (the dense map itself),
    RAR with the dense codec. Returns the maps written."""
    import pyarrow as pa

    from diclip.data import open_split
    from diclip.data.correlation import BANK_COLUMNS, SCHEMA, CorrelationStore, pack_npz
    from diclip.inference import resize_square
    from ray_jobs.common import finalize, write_shard

    if storage.is_complete(out_uri):
        return storage.read_manifest(out_uri).num_items
    base = CorrelationStore(base_uri)
    seen: set[str] = set()
    rows: list[dict] = []

    def flush() -> None:  # finalize indexes the shards (no run part: it reads them, as after a killed run)
        if rows:
            write_shard(out_uri, pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=1)
            rows.clear()

    for split in spec.correlate.splits:
        ds = open_split(spec.data, split)
        for item in ds.ids:
            if item in seen or item not in base:
                continue
            seen.add(item)
            rec = base.get([item])[0]
            image = ds.load(item).image
            x = resize_square(image, spec.data.crop_size)[None]
            n = rec.grid[0] * rec.grid[1]
            vce = colour_affinity(x, rec.grid, sigma)[0]
            rar = colour_affinity(x, rec.rar_grid, sigma)[0]
            rows.append({"item_id": item, "split": split, "src_h": image.shape[0], "src_w": image.shape[1],
                         "grid_h": rec.grid[0], "grid_w": rec.grid[1], "vce_k": n,
                         "vce_ids": np.arange(n, dtype=np.uint8).tobytes(),
                         "vce_rows": vce.numpy().astype(np.float16).tobytes(),
                         "rar_grid_h": rec.rar_grid[0], "rar_grid_w": rec.rar_grid[1], "rar_codec": "dense_fp16",
                         "rar": pack_npz({"map": rar.half().numpy()}), "crop": -1, "geom": []})
            if len(rows) == 32:
                flush()
    flush()
    extra = {**base.manifest.extra, "settings": {"maps": f"colour affinity, sigma {sigma}"}}
    extra.pop("commit_index", None)
    return finalize(out_uri, "correlate", spec, spec.correlate, [], {"diffusion": "none (colour affinity)"},
                    extra, index_columns=BANK_COLUMNS).num_items


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


def inprocess_cam_mious(spec, sigma: float = 0.1) -> dict[str, float]:
    """CAM mIoU of the DiCLIP row's model on the CAM split, through the evaluate stage's CAM code
    (``cam_pseudo_labels``), with the VCE and RAR maps taken from the stored diffusion maps or from a
    colour affinity, in every combination. ``diffusion/diffusion`` must reproduce the stage's number."""
    from diclip.data.datasets import open_split
    from diclip.inference import MapSource, cam_pseudo_labels, load_exported_model, resize_square
    from diclip.method import metrics
    from diclip.method.pseudo import rar_transition_from_mean

    model, mspec, card = load_exported_model(spec.evaluate.checkpoint, "cpu", dataset=spec.data.dataset)
    size = int(card.get("crop_size") or mspec.data.crop_size)
    patch = model.encoder.patch
    clip_grid = (size // patch, size // patch)
    stored = MapSource("stored", mspec, patch, "cpu", spec.evaluate.correlation)
    ds = open_split(spec.data, spec.evaluate.cam_split)
    k = ds.class_set.num_classes
    combos = [("diffusion", "diffusion"), ("colour", "diffusion"), ("diffusion", "colour"), ("colour", "colour")]
    cms = {c: np.zeros((k, k), np.int64) for c in combos}
    for start in range(0, len(ds.ids), 16):
        samples = [ds.load(i) for i in ds.ids[start:start + 16]]
        images = torch.stack([resize_square(s.image, size, "cpu") for s in samples])
        labels = torch.from_numpy(np.stack([s.label for s in samples])).float()
        corr_d, rar_d, rar_grid = stored([s.id for s in samples], images, [s.image.shape[:2] for s in samples])
        maps = {"diffusion": (corr_d, rar_d),
                "colour": (colour_affinity(images, clip_grid, sigma),
                           rar_transition_from_mean(colour_affinity(images, rar_grid, sigma)))}
        for vce, rar in combos:
            res = cam_pseudo_labels(model, images, labels, maps[vce][0], maps[rar][1], rar_grid,
                                    [s.image.shape[:2] for s in samples],
                                    caa_threshold=spec.evaluate.cam_caa_threshold,
                                    rar_steps=spec.evaluate.cam_rar_steps, use_adapter_cam=spec.evaluate.cam_adapter)
            for s, r in zip(samples, res):
                cms[(vce, rar)] += metrics.confusion_matrix(s.mask, r.label, k)
    return {f"VCE {v} / RAR {r}": float(metrics.summarize(cm, ds.class_set.classes)["miou"])
            for (v, r), cm in cms.items()}


def run_row(out: str, name: str, stages: list[str], overrides: list[str], common: list[str]) -> dict:
    from ray_jobs.pipeline import run_pipeline

    root = f"{out}/runs/{slug(name)}"
    spec = load_spec("configs/demo.yaml", [f"output_uri={root}", *common, *overrides,
                                           f"pipeline.stages=[{','.join(stages)}]"])
    t = time.perf_counter()
    results = run_pipeline(spec)
    seconds = round(time.perf_counter() - t, 1)
    record = os.path.join(out, "runs", slug(name), "row.json")
    if all(r.get("skipped") for r in results) and os.path.exists(record):
        seconds = json.load(open(record))["seconds"]  # a re-run of the bench: the time it took when computed
    else:
        with open(record, "w") as f:
            json.dump({"seconds": seconds}, f)
    ev = storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
    pic = storage.join(spec.evaluate.output, "pictures.png")
    if storage.exists(pic):
        shutil.copy(storage.local_path(pic), os.path.join(out, f"pictures_{slug(name)}.png"))
    return {"row": name, "cam_miou": ev["cam"]["miou"], "seg_miou": ev["segmentation"]["miou"],
            "seconds": seconds, "overrides": overrides, "spec": spec}


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
    from ray_jobs.evaluate import all_background_miou

    common = base_overrides(a.quick)
    init_ray(load_spec("configs/demo.yaml", [f"output_uri={out}/runs/diclip", *common]))
    untrained = make_untrained(os.path.join(out, "untrained_diffusion"))
    wanted = {w.strip() for w in a.rows.split(",") if w.strip()}
    results = []
    for name, stages, overrides in rows(out, untrained):
        if wanted and name not in wanted and name != "DiCLIP":
            continue
        if name == COLOUR_ROW:
            spec0 = results[0]["spec"]
            write_colour_maps(spec0.correlate.output, f"{out}/runs/{slug(name)}/correlate", spec0)
        r = run_row(out, name, stages, overrides, common)
        print(f"{name:<24} CAM {r['cam_miou']:.3f}  seg {r['seg_miou']:.3f}  ({r['seconds']:.0f} s)", flush=True)
        results.append(r)
    spec = results[0]["spec"]
    for name, value in inprocess_cam_mious(spec).items():  # CAM only: the DiCLIP row's model, in-process
        results.append({"row": f"maps: {name} (CAM only)", "cam_miou": value, "seg_miou": None})
    bg = {"row": "all background", "cam_miou": all_background_miou(spec, spec.evaluate.cam_split),
          "seg_miou": all_background_miou(spec, spec.evaluate.split)}
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
