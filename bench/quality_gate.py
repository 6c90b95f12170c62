"""Measure what the CI quality gate (``tests/stages/test_quality.py``) sees, over several training seeds.

    .venv/bin/python bench/quality_gate.py [--seeds 0,1,2] [--out bench/results/quality_gate]

Runs the test's own spec (``QUICK``) once per ``train.seed`` (the first seed builds the data, images,
masks, cache and maps; the others retrain on them), and for each seed the wiring check's CAM variants
(``diclip.toy.cam_with_maps``: stored maps, RAR map shuffled, VCE map off and shuffled: their mIoU and how far
they move the CAM scores). Prints per seed and
the minimum over seeds: the test's floors and margins are set from these minima, less a margin that
covers thread-count and kernel differences. Writes ``<out>/quality_gate.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "stages"))

import diclip  # noqa: F401,E402
from diclip import storage  # noqa: E402
from diclip.config import load_spec  # noqa: E402


def main() -> None:
    from test_quality import QUICK, WIRING_VARIANTS  # the test's spec and variants, not a copy

    from diclip.toy.cam_with_maps import cam_results
    from ray_jobs.runtime.ray_session import init_ray
    from ray_jobs.pipeline import run_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality_gate"))
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    first = f"{out}/seed{seeds[0]}"
    rows = []
    for seed in seeds:
        extra = [] if seed == seeds[0] else [
            f"data.root={first}/data", f"generate.output={first}/generate", f"mask.output={first}/mask",
            f"cache.output={first}/cache", f"correlate.output={first}/correlate",
            "pipeline.stages=[train,evaluate]"]
        spec = load_spec("configs/demo.yaml", [f"output_uri={out}/seed{seed}", *QUICK, f"train.seed={seed}", *extra])
        if seed == seeds[0]:
            init_ray(spec)
        run_pipeline(spec)
        ev = storage.read_json(storage.join(spec.evaluate.output, "metrics.json"))
        runs = cam_results(spec, WIRING_VARIANTS)
        row = {"seed": seed, "cam": ev["cam"]["miou"], "segmentation": ev["segmentation"]["miou"],
               **{f"miou {k}": runs.miou(k) for k in WIRING_VARIANTS},
               **{f"score change {k}": runs.score_change(k, "stored") for k in WIRING_VARIANTS if k != "stored"}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    low = {k: min(r[k] for r in rows) for k in rows[0] if k != "seed"}
    gaps = {f"stored - {k}": min(r["miou stored"] - r[f"miou {k}"] for r in rows) for k in WIRING_VARIANTS if k != "stored"}
    summary = {"rows": rows, "minimum": low, "minimum_gap": gaps}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quality_gate.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({"minimum": low, "minimum_gap": gaps}, indent=1))


if __name__ == "__main__":
    main()
