"""One local Ray instance for the whole pytest run (the model: Ray's own ``ray_start_regular_shared``).

``ray.init`` costs ~10 s on 2 cores; a fresh instance per test module spent about two minutes of every
``make test`` starting and stopping Ray. The instance starts at the first module that asks for it and is
shut down at the end of the run; a module that needs another Ray (the multi-node chaos cluster, a stage run
that joined something else) may shut it down, and the next module that asks starts it again.
"""
from __future__ import annotations

import os

_OWN: dict[str, str] = {}
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


def _ours() -> bool:
    import ray

    if not ray.is_initialized() or not _OWN:
        return False
    try:
        return ray.get_runtime_context().gcs_address == _OWN.get("gcs")
    except Exception:
        return False


def ensure():
    """The shared instance, started (again) when none of ours is up; a foreign one is shut down first."""
    import ray

    if _ours():
        return ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in AWS_ENV if k in os.environ}})
    _OWN["gcs"] = ray.get_runtime_context().gcs_address
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def shutdown() -> None:
    import ray

    if _ours():
        ray.shutdown()
    _OWN.clear()
