"""``diclip import-release``: the reference's released checkpoint and KV cache as a diclip export and cache.

Everything is read and checked before the first byte is written: the cache (shape, class count against
the spec's class list, one-hot values, adapter size), the checkpoint's keys and shapes against the heads
the spec builds, and - unless ``check_clip`` is off - its ``encoder.visual.*`` against ``model.clip``'s
weights, with the adapter and segmenter loaded into the very model ``evaluate``/``infer`` will build.
Then ``OUT/cache/`` (the cache, a card and a manifest) and ``OUT/`` (the export layout of
:mod:`diclip.inference`, ``card.json`` last) are written file by file atomically; an old export's card is
removed first, so an interrupted import leaves nothing that loads as a model.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from diclip import storage
from diclip.config import JobSpec, to_dict, to_yaml
from diclip.errors import ConfigError, ModelError
from diclip.models.kv_cache import KVCache, save_cache
from diclip.release.mapping import (
    SKIPPED, ClipShape, check_heads, check_visual, clip_shape, head_shapes, list_lines, sort_keys,
)
from diclip.release.reading import as_kv_pair, as_state_dict, load_hashed

SOURCE = "zwyang6/DiCLIP release"
CLIP_TOLERANCE = 1e-5
"""Largest |difference| between ``encoder.visual.*`` and ``model.clip`` accepted as the same weights (both
are fp32 copies of OpenAI's fp16 release, so they should agree exactly)."""


def _clip_id(spec: JobSpec) -> str:
    c = spec.model.clip
    return f"{c.name}/{c.pretrained or f'random-seed{c.seed}'}"


def read_cache(uri: str, spec: JobSpec, classes: list[str], clip: ClipShape, note: Callable[[str], None]) -> KVCache:
    """A released ``(keys [M, C], values [M, K])`` pair, checked against the spec, as a :class:`KVCache`."""
    obj, sha256 = load_hashed(uri)
    keys, values = as_kv_pair(obj, uri)
    k = len(classes)
    if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
        raise ModelError(f"{uri}: keys {list(keys.shape)} and values {list(values.shape)} are not [M, C] and [M, K]")
    if not keys.is_floating_point() or not torch.isfinite(keys).all():
        raise ModelError(f"{uri}: the cache keys must be finite floating-point features ({keys.dtype})")
    if keys.shape[1] != clip.embed_dim:
        raise ModelError(f"{uri}: cache keys have {keys.shape[1]} dims but model.clip {clip.name} embeds to "
                         f"{clip.embed_dim}; use the CLIP the cache was made with")
    if values.shape[1] != k:
        raise ModelError(f"{uri}: the cache has {values.shape[1]} classes but the spec's class list has {k}; "
                         "import it with the spec of the dataset it was made for (configs/voc.yaml: 21, "
                         "configs/coco.yaml: 81)")
    v = values.double()
    bad = ~((((v == 0) | (v == 1)).all(dim=1)) & (v.sum(dim=1) == 1))
    if bad.any():
        raise ModelError(f"{uri}: value row {int(bad.nonzero()[0])} is not one-hot; the values must say which class "
                         "each key belongs to (column 0 = background)")
    m = int(keys.shape[0])
    if m > spec.model.adapter_size:
        raise ModelError(f"{uri}: the cache has {m} entries but model.adapter_size={spec.model.adapter_size} "
                         f"(the KV adapter needs one hidden unit per entry); set model.adapter_size={m} or more")
    counts = v.sum(dim=0).long().tolist()
    missing = [classes[i] for i, n in enumerate(counts) if n == 0]
    if missing and not spec.cache.allow_missing_classes:
        raise ModelError(f"{uri}: no cache entries for {', '.join(missing[:5])}; their retrieval CAMs would be "
                         "undefined (set cache.allow_missing_classes=true to import it anyway)")
    fg = counts[1:] or [0]
    note(f"cache {uri}: {m} entries x {keys.shape[1]} dims, {k} classes (background {counts[0]}, "
         f"{min(fg)}-{max(fg)} per class)" + (f"; none for {', '.join(missing[:5])}" if missing else ""))
    card = {"classes": list(classes), "counts": {c: {"centroids": n} for c, n in zip(classes, counts)},
            "imported_from": {"source": SOURCE, "file": uri, "sha256": sha256, "dtype": str(keys.dtype)},
            "models": {"clip": _clip_id(spec)}, "missing_classes": missing, "num_entries": m,
            "embed_dim": int(keys.shape[1]),
            "feature_space": "the reference's (maintain_kv_cache: CLIP features of generated images in/out of masks)"}
    return KVCache(keys.float().contiguous(), v.float().contiguous(), card)


def verify_in_model(spec: JobSpec, class_set, cache: KVCache, heads: dict[str, torch.Tensor],
                    visual: dict[str, torch.Tensor], source: dict[str, str], note: Callable[[str], None]) -> None:
    """Compare ``encoder.visual.*`` with ``model.clip``'s weights and load the heads into the model that
    ``load_exported_model`` builds from this spec."""
    from diclip.inference import build_model

    model = build_model(spec, cache, "cpu", class_set)
    own = model.encoder.visual.state_dict()
    worst, where = 0.0, ""
    for k, t in visual.items():
        if k in own:
            if not bool(torch.isfinite(t).all()):
                raise ModelError(f"{source[f'visual.{k}']} holds non-finite values (NaN/inf): the checkpoint is "
                                 "damaged; download it again")
            d = float((t.double() - own[k].double()).abs().max()) if t.numel() else 0.0
            if not d <= worst:  # NaN (a non-finite weight on either side) is the worst mismatch
                worst, where = d, source[f"visual.{k}"]
                if math.isnan(d):
                    break
    if not worst <= CLIP_TOLERANCE:
        raise ModelError(f"the checkpoint's CLIP differs from model.clip {_clip_id(spec)} (max |diff| {worst:.3g} at "
                         f"{where}): it was trained with other CLIP weights; point model.clip at them, or pass "
                         "--no-clip-check to import anyway")
    try:
        model.load_trainable_state_dict(heads)
    except RuntimeError as e:
        raise ModelError(f"the adapter/segmenter do not load into the model the spec builds "
                         f"({' '.join(str(e).split())[:200]})") from e
    if visual:
        note(f"checked: {len(visual)} encoder.visual tensors equal model.clip {_clip_id(spec)} "
             f"(max |diff| {worst:.3g}); the adapter and segmenter load into the model the spec builds")


def import_release(spec: JobSpec, out: str, *, checkpoint: str | None = None, cache: str | None = None,
                   check_clip: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Import a released checkpoint and/or KV cache under ``out``; returns what was written."""
    from diclip.data import class_set_for
    from diclip.inference import CARD_FILE

    if not cache:
        raise ConfigError("import-release needs --cache (the reference keeps the KV cache out of its state dict; "
                          "an export needs the cache the checkpoint was trained with)" if checkpoint else
                          "import-release needs --checkpoint FILE and/or --cache FILE")
    storage.configure(storage.options_from(spec.storage))
    out = storage.to_uri(out)
    if not checkpoint and storage.exists(storage.join(out, CARD_FILE)):
        raise ConfigError(f"{out} holds an export; importing only a cache would change its cache; choose another --out")
    class_set = class_set_for(spec.data)
    clip = clip_shape(spec)
    if not clip.quick_gelu:  # clip_custom.py's blocks always use QuickGELU (OpenAI's weights were trained so)
        raise ConfigError(f"model.clip {_clip_id(spec)} would run GELU, but the reference's CLIP runs QuickGELU; "
                          "set model.clip.quick_gelu=true (or use pretrained=openai)")
    kv = read_cache(cache, spec, list(class_set.classes), clip, echo)
    provenance: dict = {"source": SOURCE, "cache": cache, "cache_sha256": kv.card["imported_from"]["sha256"]}
    heads = None
    if checkpoint:
        heads = read_checkpoint(checkpoint, spec, class_set, clip, kv, check_clip, provenance, echo)
    return write_import(spec, out, class_set, kv, heads, provenance, echo)


def read_checkpoint(checkpoint: str, spec: JobSpec, class_set, clip: ClipShape, kv: KVCache, check_clip: bool,
                    provenance: dict, echo: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The released checkpoint's adapter + segmenter, checked against the spec (and its CLIP against
    ``model.clip`` when ``check_clip``); what was read is recorded in ``provenance``."""
    obj, sha256 = load_hashed(checkpoint)
    state = as_state_dict(obj, checkpoint, echo)
    echo(f"checkpoint {checkpoint}: {len(state)} tensors")
    keys = sort_keys(state)
    for group, n in keys.skipped.items():
        echo(f"skipped: {n} {SKIPPED[group]}")
    list_lines("unmapped", keys.unmapped, {}, echo)
    check_visual(keys, clip, spec.model.clip.surgery_blocks, echo)
    target = head_shapes(spec, class_set.num_classes, clip, kv.num_entries)
    check_heads(keys, target, spec, class_set.num_classes, clip, echo)
    heads = {k: keys.heads[k].detach().float().contiguous() for k in target}
    echo(f"mapped: {sum(k.startswith('adapter.') for k in heads)} adapter + "
         f"{sum(k.startswith('segmenter.') for k in heads)} segmenter tensors")
    if check_clip:
        verify_in_model(spec, class_set, kv, heads, keys.visual, keys.source, echo)
    else:
        echo("not checked: encoder.visual against model.clip's weights (--no-clip-check)")
    provenance.update(checkpoint=checkpoint, checkpoint_sha256=sha256, skipped=keys.skipped,
                      unmapped=keys.unmapped, clip_checked=check_clip)
    return heads


def write_import(spec: JobSpec, out: str, class_set, kv: KVCache, heads: dict[str, torch.Tensor] | None,
                 provenance: dict, echo: Callable[[str], None]) -> dict:
    """Everything checked: write the cache and (with ``heads``) the export; an old export stops loading
    until its new card lands."""
    from diclip.data.classes import class_set_to_dict
    from diclip.inference import CACHE_DIR, CARD_FILE, FORMAT, MODEL_FILE, SPEC_FILE

    cache_uri = storage.join(out, CACHE_DIR)
    for stale in ([storage.join(out, CARD_FILE)] if heads is not None else []) + [
            storage.join(cache_uri, storage.MANIFEST_NAME)]:
        if storage.exists(stale):
            storage.delete(stale)
    save_cache(cache_uri, kv)
    digest = kv.card["imported_from"]["sha256"][:16]
    storage.write_manifest(cache_uri, storage.Manifest(
        stage="cache", shards=[], num_items=kv.num_entries, num_failed=0,
        config={"imported_from": kv.card["imported_from"]}, config_hash=digest, models={"clip": _clip_id(spec)},
        extra={"settings_hash": digest, "imported": True, "keys_shape": list(kv.keys.shape),
               "values_shape": list(kv.values.shape), "missing_classes": kv.card["missing_classes"]}))
    written = {"cache": cache_uri}
    if heads is not None:
        storage.save_tensors(storage.join(out, MODEL_FILE), heads, {"format": FORMAT})
        storage.write_text(storage.join(out, SPEC_FILE), to_yaml(spec))
        storage.write_json(storage.join(out, CARD_FILE), {
            "classes": list(class_set.classes), "dataset": class_set.name, "class_set": class_set_to_dict(class_set),
            "clip": _clip_id(spec), "crop_size": spec.data.crop_size, "steps": None, "mode": "reference-release",
            "imported_from": provenance, "model": to_dict(spec.model)})
        written["export"] = out
        echo(f"export: {out} (evaluate.checkpoint={out} infer.checkpoint={out})")
    echo(f"cache: {cache_uri} (train.cache={cache_uri}; leave generate, mask and cache out of pipeline.stages)")
    return written
