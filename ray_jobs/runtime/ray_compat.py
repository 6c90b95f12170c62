"""Every place diclip leans on Ray's private API or on the wording of Ray's errors, in one module.

Ray's public API has no way to say these things (which streaming executions run in this process, that an
actor pool timed out starting, what the autoscaler may still add, ...), so diclip reads them from Ray's
internals. A Ray upgrade can move or reword any of them without a deprecation warning; keeping them here
means one file to check, and ``tests/test_ray_compat.py`` fails loudly, naming the one that broke, when
the installed Ray no longer has what a function below relies on. At run time each degrades to the safe
side instead (said per function): a missing internal must never fail a user's job.
"""
from __future__ import annotations

import re
from typing import Any, Callable

RAY_VERSION_CHECKED = "2.60.0"
"""The Ray release these were read from (pyproject pins it; tests/test_ray_compat.py checks each still holds)."""

# --------------------------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------------------------
ACTOR_START_TIMEOUT = "Timed out while starting actors"
"""Ray Data's error when an actor pool's minimum does not start within ``DataContext.wait_for_min_actors_s``."""


def is_actor_start_timeout(e: BaseException | None) -> bool:
    """Ray Data's actor-start timeout, possibly wrapped (no public error class; matched by its text)."""
    seen = 0
    while e is not None and seen < 5:
        if ACTOR_START_TIMEOUT in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def streaming_executors() -> set:
    """Ray Data's streaming executors alive in this process (each runs as a thread of its own; private
    class). If it moved: an empty set, so nothing is stopped - as before the stop existed."""
    import threading

    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return set()
    return {t for t in threading.enumerate() if isinstance(t, StreamingExecutor)}


# --------------------------------------------------------------------------------------------------------
# Ray's errors
# --------------------------------------------------------------------------------------------------------
SYSTEM_FAILURES = ("ActorDiedError", "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError",
                   "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError", "RaySystemError", "RayActorError")
"""Ray's names for the machinery failing (a process or node gone), as opposed to code raising. Wrappers
(Ray Train's ``WorkerGroupError``, Ray Data's errors) carry them only as text, so they are matched by name."""


def is_system_failure(e: BaseException) -> bool:
    """A Ray error that says a process or node was lost (by its class, or a wrapped one named in its text)."""
    if not type(e).__module__.startswith("ray."):
        return False
    text = str(e)
    return type(e).__name__ in SYSTEM_FAILURES or any(n in text for n in SYSTEM_FAILURES) or " died" in text


_USER_ERROR = re.compile(r"diclip\.errors\.(\w+): ([^\n]+)")
"""How a diclip error raised in a Ray worker appears in the driver's exception text (Ray embeds the remote
traceback as text: an actor's constructor failure, a Ray Train worker's error)."""


def user_error_in(e: BaseException | None, prefix: str = "") -> Any:
    """The user-facing :class:`DiclipError` a worker raised, rebuilt from a Ray error (None if none): the
    exception itself, or the last ``diclip.errors.<Class>: <message>`` line in the chain's texts."""
    import diclip.errors as errors

    found = None
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, errors.DiclipError):
            return e
        for name, message in _USER_ERROR.findall(str(e)):
            cls = getattr(errors, name, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, errors.DiclipError) else errors.DiclipError
            found = cls(f"{prefix}{message}")
        e, seen = e.__cause__ or e.__context__ or getattr(e, "cause", None), seen + 1
    return found


# --------------------------------------------------------------------------------------------------------
# Ray Train
# --------------------------------------------------------------------------------------------------------
def without_placement_group_cleaner(trainer) -> None:
    """Leave out Ray Train's placement-group cleaner. It polls the State API: on an instance without one
    (``ray.dashboard=false``, a head without a dashboard) it logs "Failed to query Ray Train Controller actor
    state" every second, and with another Ray instance on the host it dies with a traceback ("Found multiple
    active Ray instances"). A second line of defence only: the worker group's placement group belongs to the
    controller actor, and Ray removes it when that actor dies. Private API; if it moved, the cleaner stays."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return
    defaults = getattr(trainer, "_create_default_callbacks", None)
    if defaults is None:
        return

    def create() -> list:
        return [c for c in defaults() if not isinstance(c, PlacementGroupCleanerCallback)]

    trainer._create_default_callbacks = create


def on_controller(trainer, callback: Callable[[Any, Callable[[Any], None]], None]) -> bool:
    """Call ``callback(controller, ray_trains_own_handler)`` when ``fit`` has started the run's controller
    actor - the only moment Ray Train hands the driver that actor (to install its SIGINT handler, private).
    The callback decides whether Ray Train's own handler (a slow "graceful abort") is installed too.
    False if the hook moved: Ray Train's handler stays and no callback is made."""
    original = getattr(trainer, "_register_sigint_handler", None)
    if original is None:
        return False

    def hook(controller) -> None:
        callback(controller, original)

    trainer._register_sigint_handler = hook
    return True


# --------------------------------------------------------------------------------------------------------
# The autoscaler (what a joined cluster may still add)
# --------------------------------------------------------------------------------------------------------
def published_node_types() -> tuple[list[dict] | None, bool]:
    """(node types' resources, whether any can grow) from the autoscaler's cluster config in the GCS
    (private state API). If it moved: (None, False) - "cannot tell", and the caller waits as before."""
    try:
        import ray._private.state

        cfg = ray._private.state.state.get_cluster_config()
    except Exception:
        return None, False
    if cfg is None or not cfg.node_group_configs:
        return None, False
    groups = [g for g in cfg.node_group_configs if g.max_count != 0 and g.resources]
    grows = any(g.max_count == -1 or g.max_count > g.min_count for g in groups)
    return [{k: float(v) for k, v in g.resources.items()} for g in groups], grows


HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray gives the head node only (private name)."""


def is_head(node: dict) -> bool:
    """Whether a record of ``ray.nodes()`` is the head node (it alone has :data:`HEAD_RESOURCE`)."""
    return HEAD_RESOURCE in (node.get("Resources") or {})


def autoscaler_status_report() -> dict:
    """The v1 autoscaler's last status report from the GCS key-value store (private key; {} when none or
    when the key moved)."""
    import json

    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        return json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
    except Exception:
        return {}


# --------------------------------------------------------------------------------------------------------
# Job submission
# --------------------------------------------------------------------------------------------------------
def gitwildmatch(patterns: list[str]) -> Any:
    """A .gitignore matcher, the one Ray's job upload itself uses (vendored, private), so diclip's check of
    what gets uploaded agrees with Ray's. None if it moved: the caller then uploads a merged copy (safe)."""
    try:
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:
        return None
    return PathSpec.from_lines("gitwildmatch", patterns)
