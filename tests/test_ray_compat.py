"""Ray's internals and error wording that diclip relies on (ray_jobs/runtime/ray_compat.py) are still there.

Each test names what a Ray upgrade broke; at run time the code degrades to the safe side instead of
failing a job, so without these checks a break would go unnoticed. Behaviour that needs a running Ray is
covered by the stage tests (named in each docstring)."""
from __future__ import annotations

import inspect
import threading
from pathlib import Path

import ray

from ray_jobs.runtime import ray_compat


def test_ray_data_streaming_executor_is_a_thread_we_can_stop():
    """ray_compat.streaming_executors / pool.stop_executors (the stall tests in tests/stages/test_fallback.py)."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    assert issubclass(StreamingExecutor, threading.Thread), "Ray Data's executor is no longer a thread"
    assert "force" in inspect.signature(StreamingExecutor.shutdown).parameters, "shutdown(force=...) changed"
    assert ray_compat.streaming_executors() == set()  # none runs in this process


def test_ray_data_still_words_the_actor_start_timeout_as_we_match_it():
    """ray_compat.is_actor_start_timeout (a pool no node can host: test_a_stage_that_cannot_be_scheduled...)."""
    import ray.data

    source = Path(ray.data.__file__).parent
    hits = [p for p in source.rglob("*.py") if ray_compat.ACTOR_START_TIMEOUT in p.read_text(errors="ignore")]
    assert hits, f"Ray Data no longer raises {ray_compat.ACTOR_START_TIMEOUT!r}"
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = TimeoutError(f"{ray_compat.ACTOR_START_TIMEOUT} after 5 s")
    assert ray_compat.is_actor_start_timeout(wrapped) and not ray_compat.is_actor_start_timeout(ValueError("x"))


def test_ray_system_failure_names_exist():
    """ray_compat.is_system_failure (faults end in one line: tests/cluster/test_chaos.py, test_weather.py)."""
    import ray.exceptions

    missing = [n for n in ray_compat.SYSTEM_FAILURES if not hasattr(ray.exceptions, n)]
    assert not missing, f"ray.exceptions lost {missing}"
    assert ray_compat.is_system_failure(ray.exceptions.NodeDiedError("node 1.2.3.4 gone"))
    assert not ray_compat.is_system_failure(ValueError("ActorDiedError"))  # not Ray's: a user's text


def test_a_diclip_error_is_found_in_a_ray_error_text():
    """ray_compat.user_error_in (an actor that cannot load its model: test_fallback.py; a train worker's
    error class kept: test_weather.py)."""
    from diclip.errors import ModelError, StorageError

    class WorkerGroupError(Exception):
        pass

    text = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
            "  File \"x.py\", line 1, in f\ndiclip.errors.StorageError: object store unreachable for 600 s\n")
    found = ray_compat.user_error_in(WorkerGroupError(text), prefix="train worker: ")
    assert isinstance(found, StorageError) and str(found) == "train worker: object store unreachable for 600 s"
    err = ModelError("no model")
    assert ray_compat.user_error_in(err) is err and ray_compat.user_error_in(ValueError("plain")) is None


def test_ray_train_hooks_we_replace_exist():
    """ray_compat.on_controller / without_placement_group_cleaner (ctrl-c and stall tests in test_train.py)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None)), "Ray Train's controller hook moved"
    assert callable(getattr(TorchTrainer, "_create_default_callbacks", None)), "Ray Train's callbacks hook moved"
    assert isinstance(PlacementGroupCleanerCallback, type)

    class Trainer:  # what the two functions do to a trainer, without building one
        def _register_sigint_handler(self, controller):
            raise AssertionError("Ray Train's own handler must not run unless the callback calls it")

        def _create_default_callbacks(self):
            return [PlacementGroupCleanerCallback.__new__(PlacementGroupCleanerCallback), "other"]

    seen = []
    trainer = Trainer()
    assert ray_compat.on_controller(trainer, lambda controller, original: seen.append(controller))
    trainer._register_sigint_handler("the controller")
    ray_compat.without_placement_group_cleaner(trainer)
    assert seen == ["the controller"] and trainer._create_default_callbacks() == ["other"]


def test_autoscaler_internals_we_read_exist():
    """ray_compat.published_node_types / autoscaler_status_report (joined-cluster checks in test_cluster.py)."""
    import ray._private.state
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    assert callable(getattr(ray._private.state.state, "get_cluster_config", None)), "cluster config API moved"
    assert isinstance(getattr(ray_constants, "DEBUG_AUTOSCALING_STATUS", None), str), "status key moved"
    assert callable(getattr(internal_kv, "_internal_kv_get", None)), "internal KV API moved"
    if not ray.is_initialized():  # not connected: the safe answers
        assert ray_compat.published_node_types() == (None, False)
        assert ray_compat.autoscaler_status_report() == {}


def test_the_upload_matcher_is_rays_own():
    """ray_compat.gitwildmatch (what `diclip submit` uploads: tests/cluster/test_cluster.py)."""
    matcher = ray_compat.gitwildmatch(["*.pyc", "runs/"])
    assert matcher is not None, "Ray's vendored pathspec moved"
    assert matcher.match_file("a/b.pyc") and matcher.match_file("runs/x") and not matcher.match_file("a/b.py")


def test_rays_head_marker_is_the_one_we_read():
    """ray_compat.is_head (CRF tasks need CPUs on a worker node, not the head's: test_cluster.py)."""
    from ray._common import constants

    names = {v for k, v in vars(constants).items() if isinstance(v, str) and "HEAD" in k}
    assert ray_compat.HEAD_RESOURCE in {n if n.startswith("node:") else f"node:{n}" for n in names}, \
        f"Ray's head-node resource is no longer {ray_compat.HEAD_RESOURCE!r}"
    assert ray_compat.is_head({"Resources": {"CPU": 4.0, ray_compat.HEAD_RESOURCE: 1.0}})
    assert not ray_compat.is_head({"Resources": {"CPU": 4.0}}) and not ray_compat.is_head({})
