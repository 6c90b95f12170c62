"""Building things must not change the process: environment variables are set at entry points only."""
from __future__ import annotations

import os

from diclip.train.deepspeed_config import build_deepspeed_config
from tests.helpers import tiny_spec


def test_building_a_deepspeed_config_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    before = dict(os.environ)
    cfg = build_deepspeed_config(tiny_spec(str(tmp_path)), use_gpu=False)
    assert cfg["train_micro_batch_size_per_gpu"] >= 1
    assert dict(os.environ) == before
