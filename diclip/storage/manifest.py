"""The artifact convention every pipeline stage follows.

``{stage_uri}/`` holds data shards, ``failures.parquet`` (``item_id``, ``error``) and
``manifest.json``. The manifest is written last and atomically, so a stage is complete exactly
when its manifest exists: a crashed or preempted stage leaves shards but no manifest and is rerun,
and downstream stages never read half-written outputs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

import diclip
from diclip.errors import StorageError
from diclip.storage import formats, fs

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.parquet"
FAILURES_SCHEMA = pa.schema([("item_id", pa.string()), ("error", pa.string())])


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ShardInfo:
    """One data shard; ``path`` is relative to the stage dir so stage dirs can be moved/copied."""

    path: str
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        if not isinstance(d, dict):
            raise StorageError(f"manifest shard entry must be an object, got {type(d).__name__}")
        _check_keys(d, {"path", "rows"}, {"path", "rows"}, "manifest shard entry")
        if not isinstance(d["path"], str) or not isinstance(d["rows"], int):
            raise StorageError(f"manifest shard entry has bad types: {d!r}")
        return cls(path=d["path"], rows=d["rows"])


@dataclass
class Manifest:
    """What a finished stage produced and how (config, versions, models), for reuse checks."""

    stage: str
    shards: list[ShardInfo]
    num_items: int  # committed items (rows)
    num_failed: int
    config: dict[str, Any]  # the stage config as a plain dict
    config_hash: str
    package_version: str = diclip.__version__
    models: dict[str, str] = field(default_factory=dict)  # e.g. {"clip": "ViT-B-16/openai"}
    created_at: str = field(default_factory=_utc_now)  # UTC ISO-8601
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific facts

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "shards": [s.to_dict() for s in self.shards],
            "num_items": self.num_items,
            "num_failed": self.num_failed,
            "config": self.config,
            "config_hash": self.config_hash,
            "package_version": self.package_version,
            "models": dict(self.models),
            "created_at": self.created_at,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Strict parse: unknown keys mean a newer/foreign writer, so refuse rather than guess."""
        if not isinstance(d, dict):
            raise StorageError(f"manifest must be a JSON object, got {type(d).__name__}")
        all_keys = {f.name for f in fields(cls)}
        required = {"stage", "shards", "num_items", "num_failed", "config", "config_hash"}
        _check_keys(d, all_keys, required, "manifest")
        if not isinstance(d["shards"], list):
            raise StorageError("manifest key 'shards' must be a list")
        for key, typ in (("stage", str), ("num_items", int), ("num_failed", int),
                         ("config", dict), ("config_hash", str), ("package_version", str),
                         ("models", dict), ("created_at", str), ("extra", dict)):
            if key in d and not isinstance(d[key], typ):
                raise StorageError(
                    f"manifest key {key!r} must be {typ.__name__}, got {type(d[key]).__name__}"
                )
        kwargs = {k: v for k, v in d.items() if k != "shards"}
        return cls(shards=[ShardInfo.from_dict(s) for s in d["shards"]], **kwargs)


def _check_keys(d: dict[str, Any], allowed: set[str], required: set[str], what: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise StorageError(f"unknown key {unknown[0]!r} in {what} (allowed: {sorted(allowed)})")
    missing = sorted(required - set(d))
    if missing:
        raise StorageError(f"missing key {missing[0]!r} in {what}")


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a config: same settings -> same hash regardless of key order."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def write_manifest(stage_uri: str, manifest: Manifest) -> None:
    """Atomically write the manifest; call this only after all shards and failures are written."""
    fs.write_json(fs.join(stage_uri, MANIFEST_NAME), manifest.to_dict())


def read_manifest(stage_uri: str) -> Manifest | None:
    """The stage's manifest, or ``None`` when the stage has not completed."""
    uri = fs.join(stage_uri, MANIFEST_NAME)
    if not fs.exists(uri):
        return None
    data = fs.read_json(uri)
    try:
        return Manifest.from_dict(data)
    except StorageError as e:
        raise StorageError(f"corrupt manifest {uri}: {e}") from e


def is_complete(stage_uri: str) -> bool:
    """A stage is complete exactly when its manifest exists (it is written last)."""
    return fs.exists(fs.join(stage_uri, MANIFEST_NAME))


def write_failures(stage_uri: str, failures: list[tuple[str, str]]) -> None:
    """Always write the file (maybe zero rows): "no failures" must differ from "not recorded"."""
    ids = [str(item_id) for item_id, _ in failures]
    errors = [str(err) for _, err in failures]
    table = pa.table(
        [pa.array(ids, pa.string()), pa.array(errors, pa.string())], schema=FAILURES_SCHEMA
    )
    formats.write_parquet(fs.join(stage_uri, FAILURES_NAME), table)


def read_failures(stage_uri: str) -> list[tuple[str, str]]:
    """``(item_id, error)`` pairs; ``[]`` when the stage wrote no failures file."""
    uri = fs.join(stage_uri, FAILURES_NAME)
    if not fs.exists(uri):
        return []
    table = formats.read_parquet(uri, columns=["item_id", "error"])
    return list(zip(table.column("item_id").to_pylist(), table.column("error").to_pylist()))
