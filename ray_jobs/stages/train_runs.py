"""What a training run is on storage, apart from running it: the settings and inputs its checkpoints depend
on (the ``settings.json`` every stage keeps), whether the output is complete or stale, Ray Train's run folder
and its latest checkpoint (what an interrupted run resumes from), clearing a run made with other settings
before training starts over, and what the driver reads back from the run's log (recoveries, curves)."""
from __future__ import annotations

import json

from diclip import storage
from diclip.config import JobSpec, to_dict
from diclip.errors import ConfigError, DiclipError
from diclip.logging import get_logger
from diclip.train.files import EXPORT, METRICS, PROGRESS, STATE, TENSORBOARD
from ray_jobs.runtime.lineage import SETTINGS_FILE, recorded_settings, settings_match

log = get_logger("ray_jobs.stages.train")


def read_checkpoint_step(uri: str) -> int:
    state_uri = storage.join(uri, STATE)
    if not storage.exists(state_uri):
        raise ConfigError(f"train.resume_from: {uri} is not a diclip training checkpoint (no {STATE})")
    return int(storage.read_json(state_uri)["step"])


RUN_FILE = SETTINGS_FILE  # what the run was made with: the record every stage keeps (lineage.claim_settings)


def run_settings(spec: JobSpec) -> dict:
    """What a training run's checkpoints depend on: model, method, data and train settings (not where it
    resumes from nor how many failures or checkpoints it tolerates) and the artifacts it reads (the images,
    the KV cache and, with stored maps, the correlation maps)."""
    from ray_jobs.runtime.lineage import data_identity, diffusion_input_settings, fingerprint

    t = {k: v for k, v in to_dict(spec.train).items()
         if k not in ("resume_from", "max_failures", "placement", "keep_checkpoints", "trust_checkpoints", "resources",
                      "tensorboard_pictures")}
    inputs = {"cache": fingerprint(t["cache"])}
    if spec.train.mode == "stored":
        inputs["correlation"] = fingerprint(t["correlation"])
    else:  # the maps are made in the step: how images become the diffusion input is part of the run
        inputs["diffusion_input"] = diffusion_input_settings(spec)
    for v in inputs.values():
        if v:
            v.pop("uri", None)
    inputs["data"] = data_identity(spec)
    from diclip.data import class_identity

    return {"train": t, "model": to_dict(spec.model), "method": to_dict(spec.method), "data": to_dict(spec.data),
            "classes": class_identity(spec.data), "inputs": inputs}


def same_run(spec: JobSpec) -> bool:
    """The output holds a run (finished or interrupted) of these settings and inputs."""
    try:
        return settings_match(spec.train.output, run_settings(spec))
    except (DiclipError, ValueError):
        return False


def is_complete(spec: JobSpec) -> bool:
    """Manifest present and trained with these settings from these inputs (cache, maps)."""
    return storage.is_complete(spec.train.output) and same_run(spec)


def stale(spec: JobSpec) -> list[str]:
    from ray_jobs.runtime.lineage import changed_keys

    old = recorded_settings(spec.train.output)
    return changed_keys(old, run_settings(spec)) if old else []


def interrupted_checkpoint(spec: JobSpec) -> str | None:
    """The latest checkpoint of an interrupted (not complete) run with these settings, else None."""
    snapshot = snapshot_uri(spec)
    try:
        if is_complete(spec) or not storage.exists(snapshot):
            return None
        if not same_run(spec):
            return None  # another run's (clear_other_run removes it before training)
        latest = storage.read_json(snapshot).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
    except (DiclipError, ValueError, TypeError, AttributeError):
        return None
    if not name:
        return None
    uri = storage.join(run_dir(spec), name)
    return uri if storage.exists(storage.join(uri, STATE)) else None


def run_dir(spec: JobSpec) -> str:
    """Ray Train's run folder (checkpoints and ``checkpoint_manager_snapshot.json``)."""
    return storage.join(spec.train.output, "ray", f"{spec.name}-train")


def snapshot_uri(spec: JobSpec) -> str:
    """Ray Train's record of the run's registered checkpoints (``latest_checkpoint_result``)."""
    return storage.join(run_dir(spec), "checkpoint_manager_snapshot.json")


RUN_OUTPUTS = (EXPORT, TENSORBOARD)
RUN_FILES = ("manifest.json", "failures.parquet", METRICS, PROGRESS, "curves.png", RUN_FILE)


def registered_step(spec: JobSpec) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for this run (its snapshot), None when none."""
    snapshot = snapshot_uri(spec)
    if not storage.exists(snapshot):
        return None
    latest = storage.read_json(snapshot).get("latest_checkpoint_result")
    if latest and "step" in (latest.get("metrics") or {}):
        return int(latest["metrics"]["step"])
    return None


def checkpoint_uri(spec: JobSpec, path: str | None) -> str | None:
    """A checkpoint path as Ray Train reports it, as a URI: with a storage filesystem Ray Train drops the
    ``s3://``, and a printed ``bucket/key`` reads like a local folder."""
    if path is None or "://" in path or not storage.is_remote(spec.train.output):
        return path
    return "s3://" + path.lstrip("/")


def _bare(uri: str) -> str:
    """A URI without its scheme, ending in '/' (Ray Train reports S3 checkpoint paths without s3://)."""
    return uri.split("://", 1)[-1].rstrip("/") + "/"


def clear_other_run(spec: JobSpec) -> None:
    """Remove a previous run made with other settings (or unknown ones) before training starts over.

    Ray Train loads any snapshot in its run folder and the workers continue from its latest checkpoint,
    so a changed setting or input would otherwise re-export the old weights as trained with the new
    ones. A run of these settings (interrupted or finished) is kept: Ray Train resumes it."""
    t = spec.train
    if same_run(spec):
        return
    folder = run_dir(spec)
    if t.resume_from and _bare(t.resume_from).startswith(_bare(folder)):
        raise ConfigError(f"train.resume_from: {t.resume_from} is in the run folder of a run with other settings, "
                          "which this run replaces; copy that checkpoint elsewhere first")
    found = storage.exists(snapshot_uri(spec)) or \
        any(storage.exists(storage.join(t.output, f)) for f in ("manifest.json", METRICS, RUN_FILE))
    if not found:
        return
    changed = stale(spec)
    log.warning("train: %s holds a run with other settings (changed: %s); starting over", t.output,
                ", ".join(changed[:6]) or "unknown")
    storage.delete_dir(folder)
    for d in RUN_OUTPUTS:
        storage.delete_dir(storage.join(t.output, d))
    for f in RUN_FILES:
        storage.delete(storage.join(t.output, f))


CURVES = "curves.png"


def note_recoveries(spec: JobSpec, fit: str) -> None:
    """This fit's worker-group restarts (the log's ``resume`` records after a failure) and the store outages
    its workers waited out, into the stage's recoveries; the log is read best effort (a record, not an input)."""
    from ray_jobs.runtime import recoveries

    rec = recoveries.current()
    uri = storage.join(spec.train.output, METRICS)
    if rec is None:
        return
    try:
        with storage.retry_budget(0):
            text = storage.read_text(uri) if storage.exists(uri) else ""
    except DiclipError:
        return
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("fit") != fit:
            continue  # an earlier run's (kept up to its checkpoint), counted there
        if r.get("kind") == "resume" and r.get("after_failure"):
            rec.resumed_from.append(int(r["step"]))
        if r.get("store_outages"):
            rec.add_store(int(r["store_outages"]), float(r.get("store_wait_s", 0.0)))


def write_curves(spec: JobSpec) -> None:
    """``{train.output}/curves.png``: losses and validation mIoUs from ``metrics.jsonl`` (a missing log
    draws nothing: the picture is a convenience, never a reason to fail a finished run)."""
    from diclip.train.curves import curves_png, read_records

    uri = storage.join(spec.train.output, METRICS)
    if not storage.exists(uri):
        log.warning("train: no %s to draw %s from", uri, CURVES)
        return
    storage.write_bytes(storage.join(spec.train.output, CURVES), curves_png(read_records(storage.read_text(uri))))
