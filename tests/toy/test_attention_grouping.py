"""``bench/attention_grouping.py`` on the shipped toy diffusion model: the method's own capture and maps,
scored against the toy world's instance masks; the numbers are finite and the table has the bench's columns."""
import importlib.util
import math
import os

import pytest

pytestmark = pytest.mark.timeout(600)

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "attention_grouping.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_attention_grouping", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_toy_model_grouping_is_finite_and_tabled():
    bench = load_bench()
    models = ("shipped toy diffusion", "colour kernel")
    spec = bench.demo_spec()
    rows, walks = bench.measure(spec, 2, models)
    assert [(r["layer"], r["map"], r["model"]) for r in rows] == [(l, m, x) for l, m in bench.MAPS for x in models]
    for r in rows:
        assert r["objects"] > 0
        for k in ("share", "chance", "ratio", "mean_ratio", "spread", "above_min_ratio"):
            assert math.isfinite(r[k]), (r, k)
        assert 0 <= r["share"] <= 1 + 1e-6 and 0 < r["chance"] < 1 and 0 < r["spread"] <= 1 + 1e-6
    # every map is scored on the same objects (same images and masks; grids differ per layer)
    assert len({r["chance"] for r in rows if r["layer"] == "VCE"}) == 1
    lines = bench.table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bench.COLUMNS)
    assert len(lines) == 2 + len(rows)
    assert all(len(line.strip("|").split("|")) == len(bench.COLUMNS) for line in lines[2:])
    # RAR's walk of a perfect CAM: one row per model, finite masses in [0, 1], starting from the same CAM
    steps = bench.walk_steps(spec)
    assert [w["model"] for w in walks] == list(models)
    keys = [f"in_object_after_{s}" for s in (0, *steps)]
    assert all(0 <= w[k] <= 1 + 1e-6 for w in walks for k in keys)
    assert len({w["in_object_after_0"] for w in walks}) == 1
    wlines = bench.walk_table(walks, steps).splitlines()
    assert len(wlines) == 2 + len(walks) and f"after {steps[0]} steps" in wlines[0]
