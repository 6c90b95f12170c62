"""What ``run`` would skip and what it would run, and why: read from the stage registry.

A stage whose outputs are complete (manifest present, made with the spec's settings from the inputs it read)
is skipped unless listed in ``pipeline.force``, so a spec can be re-run after a failure, or started from any
stage once earlier artifacts exist. Validation (which checks the weights of the stages that will run) and the
pipeline runner both read this module, and it reads neither of them.
"""
from __future__ import annotations

from diclip.config import JobSpec
from diclip.logging import get_logger
from ray_jobs import registry

log = get_logger("ray_jobs.planning")


def within(uri: str, root: str) -> bool:
    """``uri`` is ``root`` or lies under it."""
    uri, root = uri.rstrip("/"), root.rstrip("/")
    return uri == root or uri.startswith(root + "/")


def stage_complete(spec: JobSpec, name: str) -> bool:
    return registry.get(name).is_complete(spec)


def producers(spec: JobSpec, name: str) -> list[str]:
    """The stages before ``name`` in this pipeline whose output it reads (``Stage.reads``)."""
    stages = list(spec.pipeline.stages)
    earlier = stages[:stages.index(name)] if name in stages else stages
    uris = list(registry.get(name).input_uris(spec).values())
    return [p for p in earlier if any(within(u, registry.get(p).output_uri(spec)) for u in uris)]


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
        out.append((name, done, registry.get(name).output_uri(spec), upstream))
    return out


def plan(spec: JobSpec) -> list[tuple[str, bool, str]]:
    """(stage, complete, output) for the spec's stages: what ``run`` would skip and what it would run."""
    return [(name, done, uri) for name, done, uri, _ in plan_details(spec)]


def stages_to_run(spec: JobSpec) -> list[str]:
    """The spec's stages that ``run`` would not skip (complete stages need no weights)."""
    return [name for name, done, _ in plan(spec) if not done]


def stale_settings(spec: JobSpec, name: str, upstream: list[str] | None = None) -> list[str]:
    """Settings (or inputs) that changed since the stage's committed output was made, then the upstream
    stages whose output will change ("<stage> output will change"; ``upstream`` as :func:`plan_details`
    gives it, computed when None); [] if none is known."""
    stage = registry.get(name)
    try:
        own = stage.stale(spec)
    except Exception as e:  # a plan listing must not fail on an unreadable old output
        log.debug("stale check of %s failed: %s", name, e)
        own = []
    if upstream is None:
        upstream = next((up for n, _, _, up in plan_details(spec) if n == name), [])
    return own + [f"{p} output will change" for p in upstream]
