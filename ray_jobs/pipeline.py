"""Run a job spec: its stages in order on local Ray (or the cluster it is submitted to).

A stage whose outputs are complete (manifest present, made with the spec's settings from the inputs
it read) is skipped unless listed in ``pipeline.force``, so a spec can be re-run after a failure, or
started from any stage once earlier artifacts exist.
"""
from __future__ import annotations

import json
import time

from diclip import storage
from diclip.config import JobSpec, to_yaml
from diclip.logging import get_logger
from ray_jobs import faults, recoveries, stage_module
from ray_jobs.common import configure_driver

log = get_logger("ray_jobs.pipeline")

PICTURES = {"mask": "preview.png", "correlate": "preview.png", "evaluate": "pictures.png", "infer": "overlays"}
"""What each stage draws for people to look at, relative to its output."""


def stage_complete(spec: JobSpec, name: str) -> bool:
    mod = stage_module(name)
    if hasattr(mod, "is_complete"):
        return bool(mod.is_complete(spec))
    return storage.is_complete(mod.output_uri(spec))


def producers(spec: JobSpec, name: str) -> list[str]:
    """The stages before ``name`` in this pipeline whose output it reads (``validate.stage_inputs``)."""
    from ray_jobs.validate import stage_inputs, within

    stages = list(spec.pipeline.stages)
    earlier = stages[:stages.index(name)] if name in stages else stages
    uris = list(stage_inputs(spec, name).values())
    return [p for p in earlier if any(within(u, stage_module(p).output_uri(spec)) for u in uris)]


def plan_details(spec: JobSpec) -> list[tuple[str, bool, str, list[str]]]:
    """(stage, complete, output, upstream stages that will run) for the spec's stages, in order.

    A complete stage that reads the output of a stage ``run`` recomputes is not complete either, although
    its output still matches what it read: that input will change (a stale ``train`` -> ``evaluate``,
    ``infer``); the upstream list names them. A stage without a complete output of its own is simply
    run, so its list is empty."""
    will_run: set[str] = set()
    out = []
    for name in spec.pipeline.stages:
        try:
            own = stage_complete(spec, name)
        except Exception as e:  # an unreadable old output: run recomputes the stage
            log.debug("completeness check of %s failed: %s", name, e)
            own = False
        upstream = [p for p in producers(spec, name) if p in will_run] if own else []
        done = own and not upstream and name not in spec.pipeline.force
        if not done:
            will_run.add(name)
        out.append((name, done, stage_module(name).output_uri(spec), upstream))
    return out


def plan(spec: JobSpec) -> list[tuple[str, bool, str]]:
    """(stage, complete, output) for the spec's stages: what ``run`` would skip and what it would run."""
    return [(name, done, uri) for name, done, uri, _ in plan_details(spec)]


def stale_settings(spec: JobSpec, name: str, upstream: list[str] | None = None) -> list[str]:
    """Settings (or inputs) that changed since the stage's committed output was made, then the upstream
    stages whose output will change ("<stage> output will change"; ``upstream`` as :func:`plan_details`
    gives it, computed when None); [] if none is known."""
    mod = stage_module(name)
    try:
        own = list(mod.stale(spec)) if hasattr(mod, "stale") else []
    except Exception as e:  # a plan listing must not fail on an unreadable old output
        log.debug("stale check of %s failed: %s", name, e)
        own = []
    if upstream is None:
        upstream = next((up for n, _, _, up in plan_details(spec) if n == name), [])
    return own + [f"{p} output will change" for p in upstream]


def run_stage(spec: JobSpec, name: str, force: bool = False) -> dict:
    mod = stage_module(name)
    if not force and stage_complete(spec, name):
        log.info("stage %-9s complete at %s - skipped", name, mod.output_uri(spec))
        return {"stage": name, "skipped": True, "output": mod.output_uri(spec)}
    if force and hasattr(mod, "output_uri") and name != "synthesize":
        storage.delete(storage.join(mod.output_uri(spec), storage.MANIFEST_NAME))
    t0 = time.perf_counter()
    log.info("stage %-9s starting -> %s", name, mod.output_uri(spec))
    try:
        with recoveries.collect() as rec:
            summary = dict(mod.run(spec) or {})
    except Exception as e:  # a fault ends in one line that says what is kept and where a re-run resumes
        wrapped = faults.wrap(spec, name, mod.output_uri(spec), e)
        if wrapped is e:
            raise
        raise wrapped from e
    summary.update(stage=name, seconds=round(time.perf_counter() - t0, 1), output=mod.output_uri(spec))
    if rec:
        summary["recoveries"] = {**rec.as_dict(), "line": rec.line()}
        log.warning("stage %-9s recovered: %s", name, rec.line())
    log.info("stage %-9s done in %.1fs: %s", name, summary["seconds"],
             json.dumps({k: v for k, v in summary.items() if k not in ("stage", "output")}, default=str)[:400])
    return summary


def run_pipeline(spec: JobSpec, stages: list[str] | None = None) -> list[dict]:
    configure_driver(spec)
    log.debug("job spec:\n%s", to_yaml(spec))
    stages = list(stages or spec.pipeline.stages)
    results = []
    for name in stages:
        results.append(run_stage(spec, name, force=name in spec.pipeline.force))
    return results


def pictures_of(results: list[dict]) -> list[str]:
    """URIs of the pictures the finished stages wrote (skipped stages' pictures included)."""
    out = []
    for r in results:
        name = PICTURES.get(r["stage"])
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
