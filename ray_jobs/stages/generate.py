"""Stage ``generate``: text-to-image single-class images for the TSA key-value cache.

    classes x indices -> Ray Dataset -> map_batches(ImageGenerator) -> shards/part-*.parquet + manifest.json

One diffusers pipeline per actor (fp16 + xformers on GPU, fp32 on CPU). Item ``{class}/{index:05d}``
is generated from latents drawn with its own seed, derived from (class, index, ``generate.seed``):
the reference passed its seeded noise as ``noise=``, which the pipeline ignores, so its images were
unseeded; here a re-run, another actor or a bigger cache gives the same image for the same item.
Growing ``images_per_class`` from 50 to 500 generates only indices 50..499 (committed ids are skipped).

Also home of small helpers the ``mask`` and ``cache`` stages share: the settings lock (never mix
shards made with other settings in one output) and upstream-manifest fingerprints (a downstream stage
is stale when the stage it read has grown since).
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from PIL import Image

from diclip import storage
from diclip.config import JobSpec
from diclip.data import class_identity, class_set_for
from diclip.errors import ConfigError
from diclip.logging import get_logger
from diclip.storage.commit_index import ID
from ray_jobs.runtime.ray_session import start_actor
from ray_jobs.runtime.shards import committed_ids, write_shard
from ray_jobs.runtime.item_reports import report_row, short_error
from ray_jobs.runtime import pool_stage
from ray_jobs.runtime.pool_stage import PoolStage
from ray_jobs.runtime.lineage import settings_match, call_batched

log = get_logger("ray_jobs.stages.generate")
STAGE = "generate"

SCHEMA = pa.schema([
    (ID, pa.string()),
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def output_uri(spec: JobSpec) -> str:
    return spec.generate.output


# ----------------------------------------------------------------------------------------------
# what to generate
# ----------------------------------------------------------------------------------------------
def image_seed(class_name: str, index: int, base_seed: int) -> int:
    """Seed of one image: stable across runs, actors and cache sizes (sha256, not Python's hash)."""
    digest = hashlib.sha256(f"{class_name}\x00{index}\x00{base_seed}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def class_prompt(spec: JobSpec, word: str) -> str:
    cfg = spec.generate
    if word in cfg.prompt_overrides:
        return cfg.prompt_overrides[word]
    return cfg.prompt_template.replace("{}", word)


def generation_classes(spec: JobSpec) -> list[tuple[int, str, str]]:
    """(class id, class name, generation word) for every class to generate, in class-id order."""
    cs = class_set_for(spec.data)
    wanted = list(spec.generate.classes)
    unknown = [c for c in wanted if c not in cs.foreground]
    if unknown:
        raise ConfigError(f"generate.classes: {unknown[0]!r} is not a foreground class of {cs.name} "
                          f"({', '.join(cs.foreground[:6])}, ...)")
    return [(cid, name, cs.generation_words[cid - 1]) for cid, name in enumerate(cs.classes) if cid > 0
            and (not wanted or name in wanted)]


def item_id(class_name: str, index: int) -> str:
    return f"{class_name}/{index:05d}"


def list_items(spec: JobSpec) -> list[dict]:
    """Every image of the spec, class-major (a batch mostly holds one class, i.e. one prompt)."""
    cfg = spec.generate
    items = []
    for cid, name, word in generation_classes(spec):
        prompt = class_prompt(spec, word)
        for i in range(cfg.images_per_class):
            items.append({ID: item_id(name, i), "class_id": cid, "class_name": name, "prompt": prompt,
                          "seed": image_seed(name, i, cfg.seed)})
    return items


def settings(spec: JobSpec) -> dict[str, Any]:
    """Everything that determines an image's pixels (not how many, not resources)."""
    g = spec.generate
    return {"dataset": class_identity(spec.data, ("classes", "generation_words")), "source": g.source, "model_seed": spec.model.diffusion.seed,
            "num_inference_steps": g.num_inference_steps, "guidance_scale": g.guidance_scale, "size": g.size,
            "save_size": g.save_size, "seed": g.seed, "prompt_template": g.prompt_template,
            "prompt_overrides": dict(g.prompt_overrides), "dtype": g.dtype}


def stale(spec: JobSpec) -> list[str]:
    """Settings that changed since the committed generate rows were made (``validate`` lists them)."""
    from ray_jobs.runtime.lineage import stale_keys

    return stale_keys(spec.generate.output, settings(spec))


def is_complete(spec: JobSpec) -> bool:
    """Manifest present and it covers the spec's classes and images per class with these settings."""
    m = storage.read_manifest(spec.generate.output)
    if m is None:
        return False
    want = {name: spec.generate.images_per_class for _, name, _ in generation_classes(spec)}
    return m.extra.get("requested") == want and settings_match(spec.generate.output, settings(spec))


# ----------------------------------------------------------------------------------------------
# the actor
# ----------------------------------------------------------------------------------------------
def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ImageGenerator:
    """Ray Data actor: one text-to-image pipeline, loaded once; each call writes one shard."""

    def __init__(self, spec: JobSpec):
        self.cfg = spec.generate
        self.device = start_actor(spec, self.cfg.resources)
        from diclip.models.diffusion import build_diffusion, maybe_enable_xformers

        self.pipe = build_diffusion(self.cfg.source, seed=spec.model.diffusion.seed, device=self.device,
                                    dtype=self.cfg.dtype)
        self.xformers = maybe_enable_xformers(self.pipe, self.cfg.enable_xformers)
        side = self.cfg.size // self.pipe.vae_scale_factor
        self.latent_shape = (int(self.pipe.unet.config.in_channels), side, side)

    def latents(self, seeds: list[int]) -> torch.Tensor:
        """Initial noise per image from its own CPU generator (identical on any device or batch)."""
        noise = [torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.pipe.unet.dtype)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        c = self.cfg
        with torch.no_grad():
            out = self.pipe(prompt=prompts, num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                            height=c.size, width=c.size, latents=self.latents(seeds), output_type="pil")
        images = out.images
        if c.save_size != c.size:
            images = [im.resize((c.save_size, c.save_size), Image.LANCZOS) for im in images]
        return images

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        items = batch.to_dict("records")
        # one pipeline call for the whole batch: one template, per-image prompts and latents
        images = call_batched(self.generate, [[it["prompt"] for it in items], [int(it["seed"]) for it in items]],
                              STAGE)
        rows, reports = [], []
        for it, img in zip(items, images):
            if isinstance(img, Exception):
                reports.append(report_row(it[ID], False, short_error(img)))
                continue
            rows.append({ID: it[ID], "class_id": int(it["class_id"]), "class_name": it["class_name"],
                         "prompt": it["prompt"], "seed": int(it["seed"]), "image": png_bytes(img.convert("RGB")),
                         "width": img.width, "height": img.height})
            reports.append(report_row(it[ID], True))
        if rows:
            # one image per row group: the mask and cache actors fetch single images with ranged reads
            write_shard(self.cfg.output, pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=1,
                        reports=reports)
        return pd.DataFrame(reports)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
POOL = PoolStage(STAGE, "images", "generate", ImageGenerator)


def run(spec: JobSpec) -> dict:
    cfg = spec.generate
    items = list_items(spec)
    classes = len(items) // max(1, cfg.images_per_class)
    run = pool_stage.start(spec, POOL, cfg, items, settings(spec),
                           detail=f" ({classes} classes x {cfg.images_per_class})")
    failed = {i for i, _ in run.result.failures}
    new = [it for it in run.pending if it[ID] not in failed]
    per_class = Counter(i.rsplit("/", 1)[0] for i in committed_ids(cfg.output))  # earlier runs' and this one's
    requested = {name: cfg.images_per_class for _, name, _ in generation_classes(spec)}
    extra = {"requested": requested, "per_class": dict(sorted(per_class.items())), "settings_hash": run.settings_hash,
             "size": cfg.size, "save_size": cfg.save_size}
    manifest = run.commit(spec, {"diffusion": cfg.source}, extra)
    out = run.summary(manifest, "generated_now",
                      generated_per_class=dict(sorted(Counter(it["class_name"] for it in new).items())))
    log.info("generate: %d images committed, %d failed, %.2f images/s this run", manifest.num_items,
             manifest.num_failed, out["images_per_s"])
    return out
