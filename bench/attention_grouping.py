"""Does the toy diffusion model's attention group objects? In-object share of the maps DiCLIP uses.

    .venv/bin/python bench/attention_grouping.py [--count 16]

On toy-world val images (the ``synthesize`` stage's val split of ``configs/demo.yaml``: same seed, indices
and size, rendered without the JPEG round trip, with their instance masks), each diffusion model runs the
method's own capture (:class:`~diclip.models.attention_capture.DiffusionAttention`, noise seeded per item
id as the ``correlate`` stage does) and the maps are made by the method's own code:

* ``VCE``: ``ACR map`` = :func:`~diclip.models.diffusion_maps.vce_compact` expanded (what VCE adds to CLIP's
  attention), and ``q k^T chain`` = the thresholded chain of heads 1 and 2 before ACR (ACR's input);
* ``RAR``: ``softmax`` = the head-mean softmax attention (:func:`~diclip.models.diffusion_maps.rar_mean`, the
  stored map) and ``walk transition`` = :func:`~diclip.method.pseudo.rar_transition_from_mean` of it (the
  matrix the random walk multiplies the CAM by).

Models: the shipped toy diffusion model, the same pipeline with its UNet and text encoder re-initialised
(seeded; VAE kept, as ``bench/quality.py``'s ``untrained diffusion`` row), and the colour kernel of
``bench/quality.py``'s colour-maps control (:func:`~diclip.method.attention_grouping.colour_affinity`, sigma
0.1, on the same grids: as is for VCE, through the walk transition for RAR). Per map: the mean over
objects of the in-object share of their tokens' attention, the mean object area share (chance), and the
ratio (1 = no grouping), and the map's spread (mean perplexity of a row over the token count: 1 = flat,
uniform attention), and the ratio of the map less each row's minimum (the walk re-normalises after
subtracting a minimum, so a near-flat map acts through how it deviates from flat); see
:mod:`diclip.method.attention_grouping`. A second table runs RAR's walk
(:func:`~diclip.method.pseudo.rar_walk_with_transition`) on each model's walk transition from a *perfect*
CAM (each object's own mask on the CLIP grid) and reports the mass still inside the object after the
training's and the CAM evaluation's number of steps. Prints both markdown tables and writes
``bench/results/attention_grouping.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diclip  # noqa: F401,E402
from diclip.method.attention_grouping import (attention_spread, colour_affinity, object_shares,  # noqa: E402
                                              summarize, token_coverage, walk_in_object_mass)

COLUMNS = ("layer", "map", "model", "objects", "in-object share", "chance (area)", "share / chance",
           "spread (1 = uniform)", "above row min: share / chance")
MAPS = (("VCE", "ACR map"), ("VCE", "q k^T chain"), ("RAR", "softmax"), ("RAR", "walk transition"))
MODELS = ("shipped toy diffusion", "untrained diffusion", "colour kernel")
WALK_COLUMNS = ("model", "objects", "area share", "start", "after {train} steps (training)",
                "after {cam} steps (CAM evaluation)")
COLOUR_SIGMA = 0.1


def demo_spec(overrides: list[str] | None = None):
    from diclip.config import load_spec

    return load_spec(os.path.join(os.path.dirname(HERE), "configs", "demo.yaml"), overrides or [])


def toy_val(spec, count: int) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """(item ids, images [B, 3, S, S] in [0, 1], instance ids [B, S, S]) of the demo's val split."""
    from diclip.data import toy_world as world

    size = int(spec.synthesize.image_size[0])
    cfg = world.WorldConfig(size=size, max_objects=max(1, int(spec.synthesize.max_objects)))
    b = world.batch(int(spec.synthesize.seed), world.VAL_OFFSET, count, cfg)
    ids = [f"synth_val_{i:05d}" for i in range(count)]
    return ids, world.to_tensor(b["images"], normalise=False), b["instances"]


def untrained(pipe):
    """The pipeline with its UNet and text encoder re-initialised (seed 0), VAE and scheduler kept."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config)
        pipe.text_encoder = CLIPTextModel(pipe.text_encoder.config)
    if pipe.vae.dtype != torch.float32:
        pipe.unet, pipe.text_encoder = pipe.unet.to(pipe.vae.dtype), pipe.text_encoder.to(pipe.vae.dtype)
    for module in (pipe.unet, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def diffusion_maps(pipe, spec, ids: list[str],
                   images: torch.Tensor) -> dict[tuple[str, str], tuple[torch.Tensor, tuple]]:
    """The method's maps of ``images`` from one capture pass: (layer, map) -> ([B, M, M], grid)."""
    from diclip.method.acr import chain_heads, normalize_attention
    from diclip.method.pseudo import rar_transition_from_mean
    from diclip.models.attention_capture import DiffusionAttention
    from diclip.models.diffusion_maps import noise_seed, rar_mean, vce_compact
    from ray_jobs.stages.correlate import clip_patch_size

    d = spec.model.diffusion
    cap = DiffusionAttention(pipe, d, clip_patch_size(spec), mean=spec.model.clip.mean, std=spec.model.clip.std)(
        images, [noise_seed(i, d.seed) for i in ids])
    chain = chain_heads(normalize_attention(cap.vce[:, list(d.heads)].float(), spec.method.corr_threshold), (0, 1))
    rar = rar_mean(cap)
    return {("VCE", "ACR map"): (vce_compact(cap, spec.method, d).expand().float(), cap.clip_grid),
            ("VCE", "q k^T chain"): (chain, cap.clip_grid),
            ("RAR", "softmax"): (rar, cap.rar_grid),
            ("RAR", "walk transition"): (rar_transition_from_mean(rar), cap.rar_grid)}


def colour_maps(images: torch.Tensor, clip_grid: tuple, rar_grid: tuple,
                sigma: float = COLOUR_SIGMA) -> dict[tuple[str, str], tuple[torch.Tensor, tuple]]:
    """The colour-maps control on the same grids (its VCE map has no ACR: both VCE rows are the kernel)."""
    from diclip.method.pseudo import rar_transition_from_mean

    vce = colour_affinity(images, clip_grid, sigma)
    rar = colour_affinity(images, rar_grid, sigma)
    return {("VCE", "ACR map"): (vce, clip_grid), ("VCE", "q k^T chain"): (vce, clip_grid),
            ("RAR", "softmax"): (rar, rar_grid), ("RAR", "walk transition"): (rar_transition_from_mean(rar), rar_grid)}


def score(maps: dict, instances: np.ndarray) -> dict[tuple[str, str], dict]:
    """(layer, map) -> :func:`summarize` over every object of every image."""
    out = {}
    for key, (m, grid) in maps.items():
        shares, above = [], []
        for b in range(m.shape[0]):
            cov = token_coverage(torch.from_numpy(instances[b].astype(np.int64)), grid)
            shares += object_shares(m[b], cov)
            above += object_shares(m[b] - m[b].amin(-1, keepdim=True), cov)
        out[key] = {**summarize(shares), "spread": attention_spread(m), "above_min_ratio": summarize(above)["ratio"]}
    return out


def walk(maps: dict, instances: np.ndarray, steps: tuple[int, ...]) -> dict:
    """RAR's walk of a perfect CAM (each object's coverage on the CLIP grid) on the walk transition: mean
    over objects of the in-object mass at the start and after each of ``steps``, and the mean area share."""
    t, rar_grid = maps[("RAR", "walk transition")]
    clip_grid = maps[("VCE", "ACR map")][1]
    at: dict[int, list[float]] = {s: [] for s in (0, *steps)}
    area = []
    for b in range(t.shape[0]):
        objects = torch.from_numpy(instances[b].astype(np.int64))
        cc, ca = token_coverage(objects, clip_grid), token_coverage(objects, rar_grid)
        for s in at:
            masses = walk_in_object_mass(t[b], cc, ca, s, clip_grid, rar_grid)
            at[s] += list(masses.values())
        area += [float(ca[k].mean()) for k in masses]
    return {"objects": len(area), "area": float(np.mean(area)),
            **{f"in_object_after_{s}": float(np.mean(v)) for s, v in at.items()}}


def walk_steps(spec) -> tuple[int, int]:
    """(training's ``method.rar_steps``, the CAM evaluation's ``evaluate.cam_rar_steps``)."""
    return int(spec.method.rar_steps), int(spec.evaluate.cam_rar_steps)


def measure(spec, count: int, models: tuple[str, ...] = MODELS) -> tuple[list[dict], list[dict]]:
    """(grouping rows: one per (map, model) with layer, map, model and the summary (share, chance, ratio,
    spread, ...); walk rows: one per model, :func:`walk` of its RAR transition)."""
    from diclip.models.diffusion import build_diffusion_from_config

    ids, images, instances = toy_val(spec, count)
    results: dict[str, dict] = {}
    walks: dict[str, dict] = {}
    grids: dict[tuple[str, str], tuple] = {}
    for model in models:
        if model == "colour kernel":
            continue
        pipe = build_diffusion_from_config(spec.model.diffusion)
        if model == "untrained diffusion":
            pipe = untrained(pipe)
        maps = diffusion_maps(pipe, spec, ids, images)
        grids = {k: v[1] for k, v in maps.items()}
        results[model] = score(maps, instances)
        walks[model] = walk(maps, instances, walk_steps(spec))
    if "colour kernel" in models:
        if not grids:
            raise ValueError("the colour kernel is scored on a diffusion model's grids: name one in models")
        maps = colour_maps(images, grids[("VCE", "ACR map")], grids[("RAR", "softmax")])
        results["colour kernel"] = score(maps, instances)
        walks["colour kernel"] = walk(maps, instances, walk_steps(spec))
    rows = []
    for layer, name in MAPS:
        for model in models:
            s = results[model][(layer, name)]
            rows.append({"layer": layer, "map": name, "model": model, **s})
    return rows, [{"model": model, **walks[model]} for model in models]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['map']} | {r['model']} | {r['objects']} | {r['share']:.3f} | "
                     f"{r['chance']:.3f} | {r['ratio']:.2f} | {r['spread']:.2f} | {r['above_min_ratio']:.2f} |")
    return "\n".join(lines)


def walk_table(rows: list[dict], steps: tuple[int, int]) -> str:
    cols = [c.format(train=steps[0], cam=steps[1]) for c in WALK_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['objects']} | {r['area']:.3f} | {r['in_object_after_0']:.3f} | "
                     f"{r[f'in_object_after_{steps[0]}']:.3f} | {r[f'in_object_after_{steps[1]}']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=16, help="toy val images")
    a = ap.parse_args()
    from _common import write_result

    torch.manual_seed(0)
    spec = demo_spec()
    rows, walks = measure(spec, a.count)
    steps = walk_steps(spec)
    print(f"in-object share of attention, {a.count} toy val images (configs/demo.yaml), "
          f"objects' tokens = at least half inside the object\n")
    print(table(rows))
    print("\nRAR's walk of a perfect CAM (each object's own mask on the CLIP grid): mass inside the object\n")
    print(walk_table(walks, steps))
    write_result("attention_grouping", {"images": a.count, "colour_sigma": COLOUR_SIGMA, "columns": list(COLUMNS),
                                        "rows": rows, "table": table(rows), "walk_rows": walks,
                                        "walk_table": walk_table(walks, steps)})


if __name__ == "__main__":
    main()
