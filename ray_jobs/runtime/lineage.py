"""Stage lineage: what a stage's rows were made with, and where upstream rows live.

* a settings lock (``settings.json`` in the stage folder): resume skips committed items by id, so rows
  made with other settings would be mixed in silently - :func:`claim_settings` refuses instead; the
  settings include the upstream stages' settings hashes (:func:`recorded_hash`), so regenerated images
  with the same ids make the masks and the cache recompute;
* upstream fingerprints (a complete stage's shard list) recorded in downstream manifests, so a grown
  upstream (more generated images) makes the downstream stage incomplete again;
* locating and fetching rows of a complete upstream stage with ranged reads;
* batched model calls that fall back to one item at a time, so one bad item fails alone.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable

from diclip import storage
from diclip.config import JobSpec, to_dict
from diclip.errors import StorageError
from diclip.logging import get_logger
from diclip.storage.manifest import config_hash
from diclip.storage import commit_index
from diclip.storage.commit_index import ID
from ray_jobs.runtime.shards import list_shards
from ray_jobs.runtime.item_reports import short_error

log = get_logger("ray_jobs.runtime.lineage")
SETTINGS_FILE = "settings.json"


def claim_settings(stage_uri: str, stage: str, settings: dict[str, Any], also_drop: Iterable[str] = ()) -> str:
    """Record what defines this stage's rows; rows made with other settings are recomputed, never mixed in.

    The one record of "made with what" for every stage: the settings, the fingerprints of the outputs it
    read and the model ids, in ``settings.json`` next to the stage's manifest. Resume skips committed items
    by id, so shards from other settings would be silently mixed with new ones: when the settings changed,
    the stage starts over in the same output (its shards and manifest are deleted, with a warning naming
    the changed keys, and the folders in ``also_drop`` too: files a stage writes beside its shards, such as
    evaluate's pseudo-labels or infer's masks). Returns the settings hash.
    """
    h = config_hash(settings)
    uri = storage.join(stage_uri, SETTINGS_FILE)
    old = storage.read_json(uri) if storage.exists(uri) else None
    if old is not None and old.get("hash") == h:
        return h
    # rows of other settings, or of unknown ones (no settings recorded); files beside them of other settings
    if list_shards(stage_uri) or (also_drop and old is not None):
        changed = changed_keys(old.get("settings"), settings) if old is not None else []
        log.warning("%s: %s holds rows made with other settings (changed: %s); recomputing all", stage,
                    stage_uri, ", ".join(changed[:8]) or "unknown")
        commit_index.reset(stage_uri)
        for folder in also_drop:
            storage.delete_dir(storage.join(stage_uri, folder))
    storage.write_json(uri, {"stage": stage, "hash": h, "settings": settings})
    return h


def recorded_settings(stage_uri: str) -> dict[str, Any] | None:
    """The settings the stage's committed rows were made with (None: nothing recorded)."""
    uri = storage.join(stage_uri, SETTINGS_FILE)
    return storage.read_json(uri).get("settings") if storage.exists(uri) else None


def complete_with(stage_uri: str, settings: dict[str, Any] | None) -> bool:
    """The stage is committed (its manifest exists) and was made with ``settings`` (None: not knowable yet,
    e.g. the model it would read does not exist)."""
    return settings is not None and storage.is_complete(stage_uri) and settings_match(stage_uri, settings)


def changed_keys(old: dict | None, new: dict) -> list[str]:
    """Keys whose values differ between two settings dicts (dotted for nested dicts)."""
    old = old or {}
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{sub}" for sub in changed_keys(a, b)]
        elif a != b:
            out.append(k)
    return out


def stale_keys(stage_uri: str, settings: dict[str, Any]) -> list[str]:
    """Settings that differ from those the committed rows were made with ([] when none recorded);
    a changed upstream (``inputs.<stage>``) reads "<stage> output changed"."""
    uri = storage.join(stage_uri, SETTINGS_FILE)
    if not storage.exists(uri):
        return []
    return [f"{k.split('.', 1)[1]} output changed" if k.startswith(f"{INPUTS}.") else k
            for k in changed_keys(storage.read_json(uri).get("settings"), settings)]


INPUTS = "inputs"
"""Settings key of the upstream settings hashes a stage's rows were made from."""


def recorded_hash(stage_uri: str) -> str | None:
    """The settings hash an upstream stage's rows were made with (None when it records none).

    Folded into a downstream stage's settings (under :data:`INPUTS`): item ids do not change when the
    upstream is recomputed with other settings (same ids, other images), so without it the downstream
    rows of the old images would count as complete."""
    uri = storage.join(stage_uri, SETTINGS_FILE)
    return storage.read_json(uri).get("hash") if storage.exists(uri) else None


def settings_match(stage_uri: str, settings: dict[str, Any]) -> bool:
    uri = storage.join(stage_uri, SETTINGS_FILE)
    return storage.exists(uri) and storage.read_json(uri).get("hash") == config_hash(settings)


def fingerprint(stage_uri: str) -> dict[str, Any] | None:
    """Identity of a complete stage output (its manifest's shard list and the settings hash its rows were
    made with: shard names follow item ids, so rows recomputed with other settings keep them), or None
    when incomplete."""
    m = storage.read_manifest(stage_uri)
    if m is None:
        return None
    shards = hashlib.sha1("\n".join(f"{s.path}:{s.rows}" for s in sorted(m.shards, key=lambda s: s.path))
                          .encode()).hexdigest()[:16]
    return {"uri": stage_uri, "config_hash": m.config_hash, "num_items": m.num_items, "shards": shards,
            "settings_hash": m.extra.get("settings_hash")}


def same_source(recorded: dict | None, current: dict | None) -> bool:
    """Whether a downstream manifest's recorded upstream still describes the upstream output."""
    if current is None:  # upstream gone or rewriting: keep what we have
        return True
    return bool(recorded) and all(recorded.get(k) == current.get(k) for k in ("num_items", "shards"))


def data_identity(spec: JobSpec) -> dict[str, Any]:
    """Which images a stage reads from ``data.root``: where, in which layout, and - for a synthetic dataset -
    the parameters it was drawn with (image ids do not change when it is re-drawn with another seed)."""
    from diclip.data.synthetic import recorded_params

    d = spec.data
    return {"root": d.root, "layout": d.layout, "dataset": d.dataset, "synthetic": recorded_params(d.root)}


def diffusion_input_settings(spec: JobSpec) -> dict[str, Any]:
    """How images become the diffusion model's input (:func:`diclip.method.diffusion_input.diffusion_input`:
    the recipe's tag and the normalisation it round-trips through). Part of the settings of every stage that
    stores what the diffusion pass produced: rows made from another input (before the reference's uint8 /
    fp16 input, exact ``2x - 1``) are stale."""
    from diclip.method.diffusion_input import DIFFUSION_INPUT

    c = spec.model.clip
    return {"recipe": DIFFUSION_INPUT, "mean": [float(v) for v in c.mean], "std": [float(v) for v in c.std]}


def model_settings(spec: JobSpec) -> dict[str, Any]:
    """The frozen models' settings that change features and masks (for the settings lock)."""
    d = to_dict(spec.model)
    return {"clip": d["clip"], "diffusion": {k: v for k, v in d["diffusion"].items() if k != "enable_xformers"},
            "diffusion_input": diffusion_input_settings(spec)}


def clip_model_id(spec: JobSpec) -> str:
    """``name/pretrained`` as :func:`diclip.models.clip.build_clip` reports it, without loading weights."""
    c = spec.model.clip
    return f"{c.name}/{c.pretrained or f'random-seed{c.seed}'}"


def call_batched(fn: Callable[..., list], columns: list[list], what: str) -> list[Any]:
    """``fn(*columns)`` for the whole batch; if it raises, per item, so one bad item fails alone.

    Returns one result or Exception per item.
    """
    try:
        return list(fn(*columns))
    except Exception as e:
        log.warning("%s: batch of %d failed (%s); retrying one by one", what, len(columns[0]), short_error(e))
    out: list[Any] = []
    for i in range(len(columns[0])):
        try:
            out.append(fn(*[[c[i]] for c in columns])[0])
        except Exception as e1:
            out.append(e1)
    return out


def locate_rows(stage_uri: str, columns: list[str], what: str) -> list[dict]:
    """Rows of a complete stage with where they live: ``shard`` URI and ``row`` index in it."""
    manifest = storage.read_manifest(stage_uri)
    if manifest is None:
        raise StorageError(f"{what}: {stage_uri} is not complete (no manifest.json); run that stage first")
    out = []
    for s in manifest.shards:
        uri = storage.join(stage_uri, s.path)
        table = storage.read_parquet(uri, columns=columns)
        for r, row in enumerate(table.to_pylist()):
            row.update(shard=uri, row=r)
            out.append(row)
    return out


def read_located(items: list[dict], shard_key: str, row_key: str, columns: list[str]) -> dict[str, dict]:
    """Fetch ``columns`` of located rows, one ranged read per shard; item id -> row dict."""
    by_shard: dict[str, list[tuple[str, int]]] = {}
    for it in items:
        by_shard.setdefault(it[shard_key], []).append((it[ID], int(it[row_key])))
    out: dict[str, dict] = {}
    cols = columns if ID in columns else [ID, *columns]
    for shard, pairs in by_shard.items():
        table = storage.read_parquet_rows(shard, [r for _, r in pairs], columns=cols)
        for (want, _), row in zip(pairs, table.to_pylist()):
            if row[ID] != want:
                raise StorageError(f"{shard}: expected item {want} but found {row[ID]}; the upstream output changed")
            out[want] = row
    return out
