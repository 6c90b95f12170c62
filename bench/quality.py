"""The paper's ablation in miniature, on the shipped toy models and the toy world, over several training seeds.

    .venv/bin/python bench/quality.py [--seeds 0,1,2] [--quick] [--out bench/results/quality]

Every row runs the real pipeline stages (Ray Data, Ray Train + DeepSpeed, the evaluate stage) on the
same data, seeds and models; rows share what they do not change (the dataset, the generated images,
masks, cache and maps) and recompute the rest. Each row is trained once per seed (``train.seed``);
seeds after the first reuse the first seed's upstream artifacts, so a row's spread is training noise,
and the "paired" table compares rows seed by seed:

* ``DiCLIP without RAR``: no random walk on the diffusion attention (``method.rar_steps=0``).
* ``DiCLIP without VCE`` (``method.vce=false``) and ``DiCLIP without TSA`` (``method.retrieval_weight=0
  method.adapter_cam_weight=0``); ``CLIP Surgery``: neither (surgery CAMs + CAA + RAR).
* controls: ``all background``; ``untrained diffusion`` (the shipped VAE with a re-initialised UNet and
  text encoder: what attention gives without diffusion training); ``colour maps`` (training and
  evaluation with the colour affinity below as both VCE and RAR map, written as a correlation store in
  place of the diffusion maps: CAM and segmentation); ``maps: VCE x / RAR y`` (CAM only: each seed's
  DiCLIP model through the evaluate stage's own CAM code, ``diclip.toy.cam_with_maps``, with the VCE and
  the RAR map each from the stored diffusion maps, from a parameter-free colour affinity ``exp(-|rgb_i -
  rgb_j|^2 / 2 s^2)``, or the stored map with its tokens shuffled; ``diffusion / diffusion`` reproduces
  the DiCLIP row and checks the comparison).
* maps: stored whole-image maps (the rows above), the per-crop bank (``correlate.crops_per_image``),
  online per-step maps (``train.mode=online``): first seed only (``--one-seed-rows``).

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
        ("DiCLIP without TSA", tail, shared(base, "data", "generate", "mask", "cache", "correlate") + NO_TSA),
        ("DiCLIP without VCE", ["mask", "cache", *tail], shared(base, "data", "generate", "correlate") + NO_VCE),
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
    from diclip.data.map_shards import BANK_COLUMNS, SCHEMA, CorrelationStore, pack_npz
    from diclip.inference import resize_square
    from ray_jobs.runtime.shards import finalize, write_shard

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


def inprocess_cam_mious(spec, sigma: float = COLOUR_SIGMA) -> dict[str, float]:
    """CAM mIoU of the DiCLIP row's model on the CAM split with the VCE and RAR maps each from the stored
    diffusion maps, from a colour affinity, shuffled (the wiring check's variants) or off, and with TSA's
    retrieval CAM off (``method.retrieval_weight=0`` on the loaded model, its cache kept):
    ``diclip.toy.cam_with_maps``. ``VCE diffusion / RAR diffusion`` must reproduce the stage's number."""
    from diclip.toy import cam_with_maps as cm

    no_retrieval = cm.cam_mious(spec, {"TSA's retrieval CAM off": cm.stored}, method={"retrieval_weight": 0.0})
    return no_retrieval | cm.cam_mious(spec, {
        "VCE diffusion / RAR diffusion": cm.stored,
        "VCE colour / RAR diffusion": cm.colour_maps(sigma, vce=True, rar=False),
        "VCE diffusion / RAR colour": cm.colour_maps(sigma, vce=False, rar=True),
        "VCE colour / RAR colour": cm.colour_maps(sigma),
        "VCE shuffled / RAR diffusion": cm.vce_shuffled,
        "VCE diffusion / RAR shuffled": cm.rar_shuffled,
        "VCE off / RAR diffusion": cm.vce_off,
        "VCE diffusion / RAR off": cm.rar_off,
    })


def run_row(out: str, name: str, stages: list[str], overrides: list[str], common: list[str], seed: int,
            first_seed: bool) -> dict:
    """One row for one training seed. The first seed's run lives in ``runs/<row>``; other seeds' runs in
    ``runs/<row>-seed<s>`` run only train + evaluate on the first seed's upstream artifacts (``overrides``
    already point at them), so rows differ across seeds by training alone."""
    from ray_jobs.pipeline import run_pipeline

    root = f"{out}/runs/{slug(name)}" + ("" if first_seed else f"-seed{seed}")
    spec = load_spec("configs/demo.yaml", [f"output_uri={root}", *common, *overrides, f"train.seed={seed}",
                                           f"pipeline.stages=[{','.join(stages)}]"])
    t = time.perf_counter()
    results = run_pipeline(spec)
    seconds = round(time.perf_counter() - t, 1)
    record = os.path.join(root, "row.json")
    if all(r.get("skipped") for r in results) and os.path.exists(record):
        seconds = json.load(open(record))["seconds"]  # a re-run of the bench: the time it took when computed
    else:
        with open(record, "w") as f:
            json.dump({"seconds": seconds}, f)
    ev = storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
    pic = storage.join(spec.evaluate.output, "pictures.png")
    if first_seed and storage.exists(pic):
        shutil.copy(storage.local_path(pic), os.path.join(out, f"pictures_{slug(name)}.png"))
    return {"row": name, "seed": seed, "cam_miou": ev["cam"]["miou"], "seg_miou": ev["segmentation"]["miou"],
            "seconds": seconds, "overrides": overrides, "spec": spec}


def upstream(spec) -> list[str]:
    """Overrides that point a run at ``spec``'s dataset and upstream stage outputs."""
    return [f"data.root={spec.data.root}", f"generate.output={spec.generate.output}",
            f"mask.output={spec.mask.output}", f"cache.output={spec.cache.output}",
            f"correlate.output={spec.correlate.output}"]


def _stats(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], dtype=float)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (float("nan"), 0.0)


def table(by_row: dict[str, list[dict]]) -> str:
    """Mean +- standard deviation over seeds (and the per-seed values) of each row."""
    lines = ["| row | seeds | CAM mIoU (train) | seg mIoU (val) | CAM per seed | seg per seed | seconds (mean) |",
             "|---|---:|---:|---:|---|---|---:|"]

    def cell(vals):
        if all(v is None for v in vals):
            return "-", "-"
        m, sd = _stats(vals)
        return f"{100 * m:.1f} ± {100 * sd:.1f}", " / ".join("-" if v is None else f"{100 * v:.1f}" for v in vals)

    for name, rs in by_row.items():
        cam, cam_each = cell([r["cam_miou"] for r in rs])
        seg, seg_each = cell([r["seg_miou"] for r in rs])
        secs = [r["seconds"] for r in rs if r.get("seconds") is not None]
        lines.append(f"| {name} | {len(rs)} | {cam} | {seg} | {cam_each} | {seg_each} | "
                     f"{np.mean(secs):.0f} |" if secs else f"| {name} | {len(rs)} | {cam} | {seg} | {cam_each} | {seg_each} | - |")
    return "\n".join(lines)


def paired(by_row: dict[str, list[dict]], against: str = "DiCLIP") -> str:
    """What each part adds: the full method minus each ablation row, paired by training seed."""
    lines = [f"| {against} minus | CAM points (mean ± sd) | CAM per seed | seg points (mean ± sd) | seg per seed |",
             "|---|---:|---|---:|---|"]
    base = {r["seed"]: r for r in by_row[against]}
    for name, rs in by_row.items():
        if name == against or not any(r.get("seed") in base for r in rs):
            continue
        cols = []
        for key in ("cam_miou", "seg_miou"):
            d = [100 * (base[r["seed"]][key] - r[key]) for r in rs
                 if r.get("seed") in base and r[key] is not None and base[r["seed"]][key] is not None]
            if not d:
                cols += ["-", "-"]
                continue
            m, sd = _stats(d)
            cols += [f"{m:+.1f} ± {sd:.1f}", " / ".join(f"{x:+.1f}" for x in d)]
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs, measures nothing")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (train.seed) each row runs with")
    ap.add_argument("--one-seed-rows", default="per-crop bank (K=4),online maps",
                    help="rows run with the first seed only (map-source variants, not ablations)")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    from ray_jobs.runtime.ray_session import init_ray
    from ray_jobs.stages.evaluate_report import all_background_miou

    common = base_overrides(a.quick)
    seeds = [int(x) for x in a.seeds.split(",")]
    once = {w.strip() for w in a.one_seed_rows.split(",") if w.strip()}
    init_ray(load_spec("configs/demo.yaml", [f"output_uri={out}/runs/diclip", *common]))
    untrained = make_untrained(os.path.join(out, "untrained_diffusion"))
    wanted = {w.strip() for w in a.rows.split(",") if w.strip()}
    by_row: dict[str, list[dict]] = {}
    first: dict[str, object] = {}
    for seed in seeds:
        for name, stages, overrides in rows(out, untrained):
            if (wanted and name not in wanted and name != "DiCLIP") or (seed != seeds[0] and name in once):
                continue
            if seed == seeds[0]:
                if name == COLOUR_ROW:
                    spec0 = first["DiCLIP"]
                    write_colour_maps(spec0.correlate.output, f"{out}/runs/{slug(name)}/correlate", spec0)
                r = run_row(out, name, stages, overrides, common, seed, True)
                first[name] = r["spec"]
            else:
                r = run_row(out, name, ["train", "evaluate"], overrides + upstream(first[name]), common, seed, False)
            print(f"{name:<24} seed {seed}  CAM {r['cam_miou']:.3f}  seg {r['seg_miou']:.3f}  ({r['seconds']:.0f} s)",
                  flush=True)
            by_row.setdefault(name, []).append(r)
        spec = next(r["spec"] for r in by_row["DiCLIP"] if r["seed"] == seed)
        for name, value in inprocess_cam_mious(spec).items():  # CAM only: this seed's DiCLIP model, in-process
            by_row.setdefault(f"maps: {name} (CAM only)", []).append(
                {"row": f"maps: {name} (CAM only)", "seed": seed, "cam_miou": value, "seg_miou": None})
    spec = first["DiCLIP"]
    bg = {"row": "all background", "seed": None, "cam_miou": all_background_miou(spec, spec.evaluate.cam_split),
          "seg_miou": all_background_miou(spec, spec.evaluate.split)}
    by_row["all background"] = [bg]
    md = ["# DiCLIP ablation on the toy world", "",
          "Shipped toy CLIP + diffusion models (diclip/resources/toy), `configs/demo.yaml` with "
          f"`{' '.join(common)}`; `bench/quality.py --seeds {a.seeds}{' --quick' if a.quick else ''}`: each row "
          "trained once per seed (`train.seed`) on the first seed's data, images, masks, cache and maps.", "",
          table(by_row), "", "Paired by seed (the same training seed on both sides):", "", paired(by_row), ""]
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump({name: [{k: v for k, v in r.items() if k != "spec"} for r in rs] for name, rs in by_row.items()},
                  f, indent=1)
    print("\n".join(md))
    d = _stats([r["cam_miou"] for r in by_row["DiCLIP"]])[0], _stats([r["seg_miou"] for r in by_row["DiCLIP"]])[0]
    s = by_row.get("CLIP Surgery")
    s = (_stats([r["cam_miou"] for r in s])[0], _stats([r["seg_miou"] for r in s])[0]) if s else (float("nan"),) * 2
    print(f"DiCLIP CAM {d[0]:.3f} / seg {d[1]:.3f}; CLIP Surgery CAM {s[0]:.3f} / seg {s[1]:.3f}; "
          f"all-background {bg['cam_miou']:.3f}")


if __name__ == "__main__":
    main()
