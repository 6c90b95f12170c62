"""One local Ray session per test module (ray.init costs seconds; sharing it keeps stage tests fast)."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_session():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                    "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")
                                       if k in os.environ}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
