"""The training log in real weather: each step once after a resume, and an outage never stops a step."""
from __future__ import annotations

import json
import logging
import time

from diclip import storage
from diclip.train import components as C
from tests.helpers import tiny_spec


def _lines(*records: dict) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


def test_a_resumed_log_keeps_what_the_checkpoint_holds_and_drops_the_rest():
    text = _lines({"kind": "setup", "step": 0}, {"kind": "train", "step": 2}, {"kind": "eval", "step": 4},
                  {"kind": "train", "step": 6}, {"kind": "eval", "step": 8}) + '{"kind": "train", "st'
    kept = [json.loads(x) for x in C.kept_records(text, 4)]
    assert [(r["kind"], r["step"]) for r in kept] == [("setup", 0), ("train", 2), ("eval", 4)]


def test_metrics_survive_a_store_outage_without_stopping_training(seaweed, seaweed_bucket, caplog):
    spec = tiny_spec(f"{seaweed_bucket}/run")
    log = C.StepMetrics(spec, rank=0, world=1, samples_per_step=4)
    log.record("setup", {"step": 0})
    seaweed.stop(grace=2)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="diclip"):
            log.record("train", {"step": 1, "loss": 1.0})  # the store is down: a warning, no wait, no error
            log.record("train", {"step": 2, "loss": 0.9})
        assert time.monotonic() - t0 < 20  # not the 600 s an essential write would wait
    finally:
        seaweed.start()
    warned = [r.getMessage() for r in caplog.records if "not written now" in r.getMessage()]
    assert len(warned) == 1 and "training goes on" in warned[0]
    log.record("eval", {"step": 3, "val_miou": 0.5})  # the store is back: this write carries every line
    got = [json.loads(x) for x in storage.read_text(log.uri).splitlines()]
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    resumed = C.StepMetrics(spec, rank=0, world=1, samples_per_step=4, start=2)  # a restart from step 2
    resumed.record("resume", {"step": 2})
    got = [json.loads(x) for x in storage.read_text(log.uri).splitlines()]
    assert [(r["kind"], r["step"]) for r in got] == [("setup", 0), ("train", 1), ("train", 2), ("resume", 2)]
