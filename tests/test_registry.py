"""The stage registry is the one table of stages, and ``ray_jobs.pipeline.run`` is ``diclip run`` in Python."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys

import pytest

from diclip.config import JobSpec, load_spec
from diclip.errors import ConfigError
from diclip.stage_names import STAGE_NAMES
from ray_jobs import registry
from tests.helpers import REPO, tiny_spec


def test_the_registry_declares_the_names_config_accepts_in_pipeline_order() -> None:
    assert registry.names() == STAGE_NAMES
    with pytest.raises(ConfigError, match="unknown stage 'bogus'; known stages: synthesize, generate, mask"):
        registry.get("bogus")


@pytest.mark.parametrize("overrides", [[], ["train.mode=stored", "evaluate.maps=stored"], ["evaluate.cam=false"]])
def test_every_declaration_matches_the_spec_and_its_module(overrides: list[str]) -> None:
    """Sections are spec sections (with resources exactly when the stage runs on Ray), outputs and inputs are
    URI fields, and each module keeps the contract the registry calls (its own output_uri agrees)."""
    spec = load_spec("configs/demo.yaml", overrides)
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    for stage in registry.STAGES:
        assert stage.section in fields
        assert hasattr(stage.settings(spec), "resources") == stage.needs_ray, stage.name
        assert not stage.prepares_inputs or stage.needs_ray
        mod = stage.impl()
        assert all(callable(getattr(mod, f, None)) for f in ("run", "is_complete", "stale")), stage.name
        assert mod.output_uri(spec) == stage.output_uri(spec)
        assert all(isinstance(u, str) and u for u in stage.input_uris(spec).values()), stage.name
    reads = {s.name: tuple(s.input_uris(spec)) for s in registry.STAGES}
    assert ("train.correlation" in reads["train"]) == (spec.train.mode == "stored")
    assert ("evaluate.correlation" in reads["evaluate"]) == (spec.evaluate.cam and spec.evaluate.maps == "stored")


def _imports(path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or ``[]`` when it has none (a depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(m: str) -> list[str]:
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return []
        path.append(m)
        for n in sorted(graph.get(m, ())):
            cycle = visit(n)
            if cycle:
                return cycle
        path.pop()
        done.add(m)
        return []

    for m in sorted(graph):
        cycle = visit(m)
        if cycle:
            return cycle
    return []


def test_the_cycle_search_finds_long_cycles() -> None:
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_ray_jobs_modules_import_each_other() -> None:
    """No import cycle of any length among ray_jobs modules, function-level imports included: planning and
    validation read the registry, the runner reads them."""
    mods = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in (REPO / "ray_jobs").rglob("*.py")
            if p.stem != "__init__"}
    assert len(mods) > 20 and "ray_jobs.stages.correlate" in mods  # the stage, runtime and deploy folders too
    graph = {m: _imports(p) & set(mods) - {m} for m, p in mods.items()}
    assert _a_cycle(graph) == []


def test_the_help_and_the_spec_need_no_stage_module() -> None:
    code = ("import sys, diclip.config, ray_jobs.registry\n"
            "assert not [m for m in sys.modules if m.startswith('ray_jobs.') and m != 'ray_jobs.registry'], "
            "sorted(m for m in sys.modules if m.startswith('ray_jobs'))\n"
            "assert 'ray' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_the_python_api_runs_what_the_cli_runs(tmp_path) -> None:
    """``pipeline.run``: the checks first (nothing starts on a refused spec), then the stages, the hook once
    before them, and the summary written and returned; a stage that needs no Ray starts none."""
    from ray_jobs import pipeline

    connected = pipeline._ray_connected()  # a Ray of the test session's stays as it is
    calls: list[str] = []
    spec = tiny_spec(str(tmp_path / "run"), "pipeline.stages=[synthesize]")
    with pytest.raises(ConfigError, match="unknown stage 'bogus'"):
        pipeline.run(spec, ["bogus"], before_stages=lambda: calls.append("ready"))
    with pytest.raises(ConfigError, match=r"no stages chosen \(stages=\[\]\)"):
        pipeline.run(spec, [], before_stages=lambda: calls.append("ready"))
    assert not (tmp_path / "run").exists()  # refused before anything ran
    crowded = tiny_spec(str(tmp_path / "run"), "ray.num_cpus=2", "correlate.resources.num_cpus=1",
                        "correlate.resources.concurrency=2", "pipeline.stages=[synthesize,correlate]")
    with pytest.raises(ConfigError, match="correlate: its pool of 2 actors x 1 CPUs = 2 CPUs leaves 0"):
        pipeline.run(crowded, before_stages=lambda: calls.append("ready"))
    assert calls == []
    summary = pipeline.run(spec, before_stages=lambda: calls.append("ready"))
    assert calls == ["ready"] and [r["stage"] for r in summary.stages] == ["synthesize"]
    assert summary.uri == f"{spec.output_uri}/{pipeline.SUMMARY_NAME}"
    assert (tmp_path / "run" / pipeline.SUMMARY_NAME).exists()
    assert summary.lines() == pipeline.summary_lines(spec, summary.stages, summary.uri)
    assert pipeline._ray_connected() == connected
