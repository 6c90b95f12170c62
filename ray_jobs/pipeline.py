"""Run a job spec: its stages in order on local Ray (or the cluster it joins or is submitted to).

:func:`run` is the Python API and does everything ``diclip run`` does (the CLI only parses, calls it and
prints): it checks the spec, the resources and the weights, starts or joins Ray, runs the stages the plan
(:mod:`ray_jobs.planning`) does not skip, shuts down a Ray it started and writes the run's summary. A stage
whose outputs are complete is skipped unless listed in ``pipeline.force``, so a spec can be re-run after a
failure, or started from any stage once earlier artifacts exist.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

from diclip import storage
from diclip.config import JobSpec, to_yaml
from diclip.errors import ConfigError
from diclip.logging import get_logger
from ray_jobs import registry
from ray_jobs.runtime import faults, recoveries
from ray_jobs.runtime.ray_session import configure_driver, data_context_kept, init_ray
from ray_jobs.planning import stage_complete, stages_to_run
from ray_jobs.validate import check_resources, local_resources, validate_spec

log = get_logger("ray_jobs.pipeline")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a run did: every stage's summary (skipped stages too) and where their JSON copy was written."""

    spec: JobSpec
    stages: list[dict]
    uri: Optional[str]
    """``{output_uri}/run-summary.json``; None when the store refused it (logged, the run still succeeded)."""

    def lines(self) -> list[str]:
        """The human-sized end of the run that ``diclip run`` prints."""
        return summary_lines(self.spec, self.stages, self.uri)

    @property
    def pictures(self) -> list[str]:
        return pictures_of(self.stages)


def check(spec: JobSpec, stages: Optional[list[str]] = None) -> None:
    """Refuse, in one line, what :func:`run` could not finish, before Ray starts or a weight loads.

    The whole pipeline (``stages`` None) gets :func:`ray_jobs.validate.validate_spec`; chosen stages (their
    inputs may come from anywhere) get what would otherwise wait forever or fail in every actor: a plan the
    local Ray cannot host, and missing weights."""
    if stages is None:
        validate_spec(spec)
        return
    if not stages:
        raise ConfigError("no stages chosen (stages=[]); pass stage names, or stages=None to run the spec's "
                          f"pipeline.stages ({', '.join(spec.pipeline.stages)})")
    for name in stages:
        registry.get(name)  # an unknown name: one line listing the known ones
    local = local_resources(spec)
    if local is not None:
        chosen = dataclasses.replace(spec, pipeline=dataclasses.replace(spec.pipeline, stages=list(stages)))
        check_resources(chosen, *local)
    from diclip.models.sources import check_stage_models

    check_stage_models(spec, stages)  # one line here, not a traceback from every actor


def _ray_connected() -> bool:
    ray_mod = sys.modules.get("ray")
    return ray_mod is not None and ray_mod.is_initialized()


def _start_ray(spec: JobSpec, stages: Optional[list[str]]) -> None:
    """Start or join Ray; on a joined cluster refuse a stage no node of it can ever host."""
    init_ray(spec)
    if local_resources(spec) is None:
        from ray_jobs.deploy.cluster_fit import check_joined_cluster

        check_joined_cluster(spec, stages or stages_to_run(spec))


def run(spec: JobSpec, stages: Optional[list[str]] = None,
        before_stages: Optional[Callable[[], None]] = None) -> RunSummary:
    """Run the spec's pipeline (``stages`` None: ``diclip run``) or the chosen stages (``diclip <stage>``).

    :func:`check` first; then Ray is started (or joined: ``ray.address``, a submitted job) when a stage needs
    it, and a Ray this call started is shut down when it ends, also on an error, so the workers' last log
    lines come before the summary or the error line. ``before_stages`` runs once Ray is up, before the first
    stage: the CLI installs its signal handlers there (``ray.init`` replaces the SIGTERM handler). Raises
    :class:`~diclip.errors.DiclipError` (a user's mistake) or :class:`~diclip.errors.StageFault` (a fault of
    the cluster or the store: run again to resume)."""
    stages = None if stages is None else list(stages)
    check(spec, stages)
    joined = _ray_connected()
    try:
        if any(registry.get(s).needs_ray for s in stages or spec.pipeline.stages):
            _start_ray(spec, stages)
        if before_stages is not None:
            before_stages()
        results = run_pipeline(spec, stages)
    finally:
        if not joined and _ray_connected():
            sys.modules["ray"].shutdown()
    return RunSummary(spec, results, write_summary(spec, results))


def run_stage(spec: JobSpec, name: str, force: bool = False) -> dict:
    """Run one stage on the Ray this process is connected to (no checks: :func:`run` makes them)."""
    stage = registry.get(name)
    output = stage.output_uri(spec)
    if not force and stage_complete(spec, name):
        log.info("stage %-9s complete at %s - skipped", name, output)
        return {"stage": name, "skipped": True, "output": output}
    if force and name != "synthesize":  # synthesize's output is a dataset (data.root), not a stage's own folder
        storage.delete(storage.join(output, storage.MANIFEST_NAME))
    t0 = time.perf_counter()
    log.info("stage %-9s starting -> %s", name, output)
    try:
        with recoveries.collect() as rec, data_context_kept() if stage.needs_ray else nullcontext():
            summary = stage.run(spec)
    except Exception as e:  # a fault ends in one line that says what is kept and where a re-run resumes
        wrapped = faults.wrap(spec, name, output, e)
        if wrapped is e:
            raise
        raise wrapped from e
    summary.update(stage=name, seconds=round(time.perf_counter() - t0, 1), output=output)
    if rec:
        summary["recoveries"] = {**rec.as_dict(), "line": rec.line()}
        log.warning("stage %-9s recovered: %s", name, rec.line())
    log.info("stage %-9s done in %.1fs: %s", name, summary["seconds"],
             json.dumps({k: v for k, v in summary.items() if k not in ("stage", "output")}, default=str)[:400])
    return summary


def run_pipeline(spec: JobSpec, stages: list[str] | None = None) -> list[dict]:
    """Run the stages (all of the spec's when None) on the Ray this process is connected to, without
    :func:`run`'s checks (tests and benchmarks that start their own Ray)."""
    configure_driver(spec)
    log.debug("job spec:\n%s", to_yaml(spec))
    stages = list(spec.pipeline.stages if stages is None else stages)
    results = []
    for name in stages:
        results.append(run_stage(spec, name, force=name in spec.pipeline.force))
    return results


def pictures_of(results: list[dict]) -> list[str]:
    """URIs of the pictures the finished stages wrote (skipped stages' pictures included)."""
    out = []
    for r in results:
        name = registry.get(r["stage"]).pictures
        if name:
            uri = storage.join(r["output"], name)
            if storage.exists(uri):
                out.append(uri)
    return out


SUMMARY_NAME = "run-summary.json"
"""Every stage's full summary of the last ``diclip run`` (the terminal gets a few lines per stage)."""
HEADLINE_KEYS = ("images", "failed", "kept", "filtered", "steps", "loss", "val_miou", "seg_miou", "cam_miou")
"""Stage-summary numbers worth a glance; everything else stays in the JSON file."""


def _fmt(key: str, value: object) -> str:
    if key.endswith("miou") and isinstance(value, (int, float)):
        return f"{key} {100 * value:.1f}%"
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    return f"{key} {value}"


def summary_lines(spec: JobSpec, results: list[dict], summary_uri: str | None) -> list[str]:
    """A short, human-sized end of a run: one line per stage, the pictures, and what the numbers mean."""
    from diclip.models.sources import random_models

    lines = [f"job {spec.name}: {len(results)} stage(s), outputs under {spec.output_uri}"]
    for r in results:
        if r.get("skipped"):
            status = "skipped (complete)"
        else:
            facts = [_fmt(k, r[k]) for k in HEADLINE_KEYS if r.get(k) is not None]
            status = f"done in {r.get('seconds', 0):.0f}s" + (f": {', '.join(facts)}" if facts else "")
            if r.get("recoveries"):
                status += f"; recovered: {r['recoveries']['line']}"
        lines.append(f"  {r['stage']:<10} {status}")
    pictures = pictures_of(results)
    if pictures:
        lines.append("pictures: " + "  ".join(pictures))
    randoms = random_models(spec)
    if randoms and any(r["stage"] in ("train", "evaluate") for r in results):
        lines.append(f"note: {', '.join(randoms)}: the models are random, so mIoU near 0 is expected; the run shows "
                     "that the machinery works, not what DiCLIP scores")
    if summary_uri:
        lines.append(f"full summary: {summary_uri}")
    return lines


def write_summary(spec: JobSpec, results: list[dict]) -> str | None:
    """Write every stage's summary as JSON next to the outputs; None when the store refuses (logged)."""
    uri = storage.join(spec.output_uri, SUMMARY_NAME)
    try:
        storage.write_text(uri, json.dumps({"job": spec.name, "output_uri": spec.output_uri, "stages": results},
                                           indent=2, default=str) + "\n")
    except Exception as e:  # the run itself succeeded; losing the file must not fail it
        log.warning("could not write %s: %s", uri, e)
        return None
    return uri
