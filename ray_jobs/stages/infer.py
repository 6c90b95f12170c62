"""Stage ``infer``: masks for a folder or bucket of new (unlabelled) images.

    infer.input (dir or s3:// prefix; .jpg/.jpeg/.png, recursive) -> items (one per image)
    -> Ray Data actor pool (Inferer: the exported DiCLIP loaded once per actor; multi-scale + flip
       segmenter inference, see diclip.inference)
    -> masks/<name>.png (VOC palette, mode P, pixel = class id, original size)
       [overlays/<name>.jpg]  -> shards/part-*.parquet (one per call) -> failures.parquet, manifest.json

``<name>`` is the image's path under ``infer.input`` without its extension (with it, when two inputs
would share a name). Any mode PIL decodes works (grayscale, RGBA, palette, 16-bit); sizes need not be
multiples of 16 (every scale's input is a square resized from the whole image; masks come back at the
original size). A corrupt or unreadable image is a failures.parquet row, never fatal. Resumable: an
image whose mask (and overlay, if enabled) exists and whose row is committed is not recomputed.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from diclip import storage
from diclip.config import JobSpec
from diclip.errors import DiclipError
from diclip.logging import get_logger
from diclip.storage.commit_index import ID
from ray_jobs.runtime import lineage, pool_stage
from ray_jobs.runtime.ray_session import start_actor
from ray_jobs.runtime.shards import committed_ids, write_shard
from ray_jobs.runtime.item_reports import item_error, report_row, short_error
from ray_jobs.runtime.lineage import call_batched
from ray_jobs.runtime.pool_stage import PoolStage

log = get_logger("ray_jobs.stages.infer")
STAGE = "infer"
SUFFIXES = (".jpg", ".jpeg", ".png")
MASKS = "masks"
OVERLAYS = "overlays"
OVERLAY_ALPHA = 0.5  # half image, half class colour: both the object and the mask stay readable
SCHEMA = pa.schema([
    (ID, pa.string()),  # the image's name (path under infer.input without extension)
    ("source", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("classes", pa.list_(pa.int16())),  # class ids present in the mask
    ("mask", pa.string()),  # relative to infer.output
    ("overlay", pa.string()),  # relative to infer.output, or null
])


def output_uri(spec: JobSpec) -> str:
    return spec.infer.output


def mask_rel(name: str) -> str:
    return f"{MASKS}/{name}.png"


def overlay_rel(name: str) -> str:
    return f"{OVERLAYS}/{name}.jpg"


def list_items(spec: JobSpec) -> list[dict]:
    """One item per image file under ``infer.input`` (outputs of this stage excluded)."""
    cfg = spec.infer
    base = cfg.input.rstrip("/")
    out_prefix = cfg.output.rstrip("/") + "/"
    files = [f for f in storage.list_files(base) if f.lower().endswith(SUFFIXES) and not f.startswith(out_prefix)]
    rels = [f[len(base):].lstrip("/") for f in files]
    stems = [r.rsplit(".", 1)[0] for r in rels]
    dup = {s for s, n in Counter(stems).items() if n > 1}
    return [{ID: (r if s in dup else s), "source": f} for f, r, s in zip(files, rels, stems)]


class Inferer:
    """Ray Data actor: the exported model loaded once; each call writes masks, overlays, one shard."""

    def __init__(self, spec: JobSpec, base_size: int):
        from diclip.inference import load_exported_model

        self.cfg = spec.infer
        self.device = start_actor(spec, self.cfg.resources)
        self.model, self.model_spec, self.card = load_exported_model(self.cfg.checkpoint, self.device)
        self.base = base_size
        self.patch = self.model.encoder.patch

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from diclip.data import decode_image
        from diclip.inference import segment, segmenter_forward
        from diclip.viz import encode_mask_png, encode_rgb, overlay

        c = self.cfg
        reports, members = [], []
        for name, source in zip(batch[ID], batch["source"]):
            try:
                members.append((name, source, decode_image(storage.read_bytes(source), source)))
            except DiclipError as e:
                reports.append(report_row(name, False, item_error(e)))
            except Exception as e:  # unexpected decoder/IO errors fail the item, not the stage
                reports.append(report_row(name, False, short_error(e)))
        rows = []
        if members:
            def run(images):
                return segment(segmenter_forward(self.model), images, self.base, c.scales, flip=c.flip,
                               work_ratio=c.work_ratio, multiple=self.patch, device=self.device)

            # batched, falling back to one image at a time (one bad image or an OOM fails alone)
            masks = call_batched(run, [[m[2] for m in members]], STAGE)
            for (name, source, image), mask in zip(members, masks):
                if isinstance(mask, Exception):
                    reports.append(report_row(name, False, item_error(mask)))
                    continue
                try:
                    storage.write_bytes(storage.join(c.output, mask_rel(name)), encode_mask_png(mask))
                    ov = None
                    if c.overlays:
                        ov = overlay_rel(name)
                        storage.write_bytes(storage.join(c.output, ov),
                                            encode_rgb(overlay(image, mask, OVERLAY_ALPHA), "JPEG"))
                except DiclipError as e:
                    reports.append(report_row(name, False, item_error(e)))
                    continue
                rows.append({ID: name, "source": source, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                             "classes": [int(v) for v in np.unique(mask)], "mask": mask_rel(name), "overlay": ov})
                reports.append(report_row(name, True))
        if rows:  # after the PNGs: a committed row implies its files exist
            write_shard(c.output, pa.Table.from_pylist(rows, schema=SCHEMA), reports=reports)
        return pd.DataFrame(reports)


def run_key(spec: JobSpec, info) -> dict:
    """What every committed mask depends on (the export's weights, the input, the protocol)."""
    cfg = spec.infer
    return {"checkpoint": cfg.checkpoint, "fingerprint": info.fingerprint, "input": cfg.input,
            "size": cfg.size or info.crop_size, "scales": list(cfg.scales), "flip": cfg.flip,
            "work_ratio": cfg.work_ratio}


def current_key(spec: JobSpec) -> dict | None:
    from diclip.errors import DiclipError
    from diclip.inference import read_export

    try:
        return run_key(spec, read_export(spec.infer.checkpoint))
    except DiclipError:
        return None


def is_complete(spec: JobSpec) -> bool:
    """Manifest present and made from this export with these settings (a new input folder adds images)."""
    return lineage.complete_with(spec.infer.output, current_key(spec))


def stale(spec: JobSpec) -> list[str]:
    key = current_key(spec)
    return lineage.stale_keys(spec.infer.output, key) if key is not None else []


def pending_of(spec: JobSpec) -> Callable[[list[dict]], list[dict]]:
    """Items whose shard row, mask or overlay (when asked for) is missing: a deleted mask is redone alone."""
    cfg = spec.infer

    def pending(items: list[dict]) -> list[dict]:
        done = committed_ids(cfg.output)
        have_masks = set(storage.list_files(storage.join(cfg.output, MASKS), suffix=".png"))
        have_overlays = (set(storage.list_files(storage.join(cfg.output, OVERLAYS), suffix=".jpg")) if cfg.overlays
                         else set())

        def complete(it: dict) -> bool:
            name = it[ID]
            return (name in done and storage.join(cfg.output, mask_rel(name)) in have_masks
                    and (not cfg.overlays or storage.join(cfg.output, overlay_rel(name)) in have_overlays))

        return [it for it in items if not complete(it)]

    return pending


POOL = PoolStage(STAGE, "images", "segment", Inferer)


def run(spec: JobSpec) -> dict:
    from diclip.inference import read_export

    cfg = spec.infer
    info = read_export(cfg.checkpoint)
    key = run_key(spec, info)
    run = pool_stage.start(spec, POOL, cfg, list_items(spec), key, ctor_kwargs={"spec": spec, "base_size": key["size"]},
                           pending=pending_of(spec), also_drop=[MASKS, OVERLAYS], detail=f" under {cfg.input}")
    manifest = run.commit(spec, {"export": cfg.checkpoint, "clip": str(info.card.get("clip", ""))},
                          {"classes": info.classes, "base_size": key["size"], "fingerprint": info.fingerprint})
    out = run.summary(manifest, "segmented_now")
    log.info("infer: %d masks committed, %d failed, %.2f images/s this run", manifest.num_items,
             manifest.num_failed, out["images_per_s"])
    return out
