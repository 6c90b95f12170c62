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


def test_a_stage_leaves_ray_datas_context_as_it_found_it(tmp_path):
    """Training sets ``preserve_order`` (and every Ray stage its progress-bar and log settings) on Ray Data's
    process-wide context; what a stage sets is undone after it, so a notebook's next Dataset is not ordered or
    quietened by a stage it ran before."""
    import ray.data

    from ray_jobs.runtime.ray_session import configure_data_context, data_context_kept

    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    spec = tiny_spec(str(tmp_path), "ray.progress_bars=false")
    with data_context_kept():
        configure_data_context(spec)
        inner = ray.data.DataContext.get_current()
        inner.execution_options.preserve_order = not before[0]
        assert inner.enable_progress_bars is False and inner.print_on_execution_start is False
    after = ray.data.DataContext.get_current()
    assert after is ctx
    assert (after.execution_options.preserve_order, after.enable_progress_bars,
            after.print_on_execution_start) == before
