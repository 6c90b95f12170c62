"""``diclip validate``: check a job spec before anything runs.

Structural checks (unknown keys, types, value ranges, unknown stage names) already happen when the
spec is loaded. Here: every URI is well formed, and every input a stage reads is either produced by
an earlier stage of this pipeline or already exists. Each problem is one line naming the field.
"""
from __future__ import annotations

from diclip import storage
from diclip.config import JobSpec
from diclip.errors import ConfigError, StorageError

# stage -> {field path: stage that produces it}; inputs are artifact URIs read by the stage
STAGE_OUTPUT = {
    "synthesize": "data.root",
    "generate": "generate.output",
    "mask": "mask.output",
    "cache": "cache.output",
    "correlate": "correlate.output",
    "train": "train.output",
    "evaluate": "evaluate.output",
    "infer": "infer.output",
}


def stage_inputs(spec: JobSpec, stage: str) -> dict[str, str]:
    """Artifacts a stage reads, as {config field: URI}."""
    d = {
        "generate": {},
        "mask": {"mask.images": spec.mask.images},
        "cache": {"cache.images": spec.cache.images, "cache.masks": spec.cache.masks},
        "correlate": {"data.root": spec.data.root},
        "train": {"data.root": spec.data.root, "train.cache": spec.train.cache},
        "evaluate": {"data.root": spec.data.root, "evaluate.checkpoint": spec.evaluate.checkpoint},
        "infer": {"infer.checkpoint": spec.infer.checkpoint, "infer.input": spec.infer.input},
        "synthesize": {},
    }[stage]
    if stage == "train" and spec.train.mode == "stored":
        d["train.correlation"] = spec.train.correlation
    if stage == "evaluate" and spec.evaluate.cam and spec.evaluate.maps == "stored":
        d["evaluate.correlation"] = spec.evaluate.correlation
    return d


def _get(spec: JobSpec, path: str) -> str:
    obj = spec
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _check_uri(field: str, uri: str) -> None:
    if not uri or not isinstance(uri, str):
        raise ConfigError(f"{field}: empty URI")
    try:
        storage.join(uri, "x")
    except StorageError as e:
        raise ConfigError(f"{field}: {e}") from e
    if uri.startswith("s3://") and len(uri) <= len("s3://"):
        raise ConfigError(f"{field}: s3 URI needs a bucket, got {uri!r}")


def _within(uri: str, root: str) -> bool:
    uri, root = uri.rstrip("/"), root.rstrip("/")
    return uri == root or uri.startswith(root + "/")


def validate_spec(spec: JobSpec, check_exists: bool = True) -> None:
    _check_uri("output_uri", spec.output_uri)
    if check_exists:
        storage.exists(spec.output_uri)  # an unreachable store or a missing bucket fails here, before Ray starts
    produced: dict[str, str] = {}
    for stage in spec.pipeline.stages:
        out_field = STAGE_OUTPUT[stage]
        for field, uri in stage_inputs(spec, stage).items():
            _check_uri(field, uri)
            if any(_within(uri, p) for p in produced.values()):
                continue
            if not check_exists:
                continue
            if not storage.exists(uri):
                producer = next((s for s, f in STAGE_OUTPUT.items() if _within(uri, _get(spec, f))), None)
                hint = f"; add stage {producer!r} before {stage!r} or run it first" if producer and producer != stage else ""
                raise ConfigError(f"{field}: {uri} does not exist and no earlier stage produces it{hint}")
        out = _get(spec, out_field)
        _check_uri(out_field, out)
        produced[stage] = out
