"""Starting or joining Ray, and what every driver and actor process sets up: the environment the
workers get, Ray Data's context, the device an actor runs on, and what the cluster's nodes offer."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diclip import storage
from diclip.config import JobSpec, Resources
from diclip.logging import get_logger, init_logging, quiet_library_logs

log = get_logger("ray_jobs.runtime.ray_session")


def worker_env(spec: JobSpec) -> dict[str, str]:
    """Environment every Ray worker needs (credentials stay in the user's environment, never the spec)."""
    env = {
        "DICLIP_LOG_LEVEL": os.environ.get("DICLIP_LOG_LEVEL", "INFO"),
        "TOKENIZERS_PARALLELISM": "false",
        # libraries' notices to their own developers (Ray Train's use of a deprecated Ray Data option,
        # DeepSpeed's of a deprecated torch.distributed call) are not the job's news; tests check diclip's own
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning"),
    }
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_EC2_METADATA_DISABLED", "HF_HOME",
                "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    if spec.storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = spec.storage.endpoint_url
    if env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3"):
        # an S3-compatible store has no EC2 metadata service to probe; on AWS the probe finds the
        # instance-profile credentials (cluster/README.md), so it is left on there
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return env


DASHBOARD_SCHEMES = ("http://", "https://")


def drop_dashboard_address() -> str | None:
    """Remove an exported ``RAY_ADDRESS=http://HOST:8265`` from this process's environment; return it.

    That address is the Jobs API (what ``diclip submit/status/logs`` use), not a cluster ``ray.init`` can
    join: Ray refuses it ("Invalid Ray address"). ``diclip run`` outside a submitted job therefore ignores
    it and starts (or joins) Ray as the spec says; ``ray.address`` joins a cluster explicitly."""
    address = os.environ.get("RAY_ADDRESS", "")
    if os.environ.get("RAY_JOB_ID") or not address.startswith(DASHBOARD_SCHEMES):
        return None
    del os.environ["RAY_ADDRESS"]
    return address


def init_ray(spec: JobSpec) -> None:
    """Start or join Ray as the spec says; no-op when this process is already connected.

    Inside a submitted Ray job (``RAY_JOB_ID`` set) the driver joins the job's cluster and inherits
    its runtime env; passing resources or env vars again there is refused by Ray.
    """
    import ray

    if ray.is_initialized():
        return
    dashboard = drop_dashboard_address()
    if dashboard:
        log.info("note: ignoring RAY_ADDRESS=%s (a dashboard address, for diclip submit/status/logs); this run "
                 "uses %s", dashboard, f"ray.address={spec.ray.address}" if spec.ray.address else "a local Ray")
    in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    if in_job:
        ray.init(address=spec.ray.address or "auto", log_to_driver=True)
    elif spec.ray.address:
        # a driver joining a running cluster hands its workers the same environment a local run or a
        # submitted job gives them (the store's endpoint, credentials, quiet library notices): without it
        # they ran with whatever the nodes were started with
        ray.init(address=spec.ray.address, log_to_driver=True, runtime_env={"env_vars": worker_env(spec)})
    else:
        # RAY_BACKEND_LOG_LEVEL stays as the user has it: set to any level, every Ray worker process prints
        # "logging.cc: Set ray log level from environment variable" when it starts (14 lines in a 2-worker
        # training run, measured), where unset the C++ core prints one harmless line per restartable actor
        env = worker_env(spec)
        kwargs: dict[str, Any] = {"log_to_driver": True, "include_dashboard": bool(spec.ray.dashboard)}
        if spec.ray.dashboard:
            # Address our own instance explicitly: Ray Train's placement-group cleaner queries the State
            # API, which otherwise auto-detects "the" local Ray and fails when another instance runs on
            # this host ("Found multiple active Ray instances").
            port = free_port()
            kwargs["dashboard_port"] = port
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs["runtime_env"] = {"env_vars": env}
        if spec.ray.num_cpus:
            kwargs["num_cpus"] = spec.ray.num_cpus
        ray.init(**kwargs)
    configure_data_context(spec)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configure_data_context(spec: JobSpec) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = spec.ray.show_progress()
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


@contextmanager
def data_context_kept() -> Iterator[None]:
    """Ray Data's context is process state a stage sets (progress bars, ``preserve_order`` for training, the
    shuffle strategy): the block works on a copy (``DataContext.current``), so the next stage - or a
    notebook's own Ray Data code - starts from what the process had before."""
    import copy

    import ray.data

    with ray.data.DataContext.current(copy.deepcopy(ray.data.DataContext.get_current())):
        yield


def setup_process(spec: JobSpec) -> None:
    """Per-actor/worker setup: logging, storage endpoint, CPU threads."""
    init_logging()
    quiet_library_logs()
    storage.configure(storage.options_from(spec.storage))


def configure_driver(spec: JobSpec) -> None:
    setup_process(spec)


def actor_device(res: Resources) -> str:
    import torch

    return "cuda" if res.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def start_actor(spec: JobSpec, res: Resources) -> str:
    """Actor constructor preamble: process setup, the device its resources ask for, and torch threads
    matching the CPUs Ray reserved for it (more would oversubscribe the node). Returns the device."""
    import torch

    setup_process(spec)
    device = actor_device(res)
    torch.set_num_threads(max(1, int(res.num_cpus)))
    return device


def map_batches_kwargs(res: Resources) -> dict[str, Any]:
    """Ray Data actor-pool arguments from a stage's resources.

    GPU stages need an explicit batch size (Ray refuses the CPU default), and ``num_gpus`` must stay
    None (not 0) on CPU stages or Ray treats them as GPU stages.
    """
    from ray.data import ActorPoolStrategy

    kw: dict[str, Any] = {"batch_size": res.batch_size, "compute": ActorPoolStrategy(size=res.concurrency),
                          "num_cpus": res.num_cpus}
    if res.num_gpus > 0:
        kw["num_gpus"] = res.num_gpus
    return kw


def free_and_total() -> tuple[dict, dict]:
    """The cluster's free and total CPUs/GPUs, for messages ({} when Ray cannot say: a message must not fail)."""
    try:
        import ray

        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    except Exception:
        return {}, {}
    return free, total


def alive_node_records() -> list[dict]:
    """``ray.nodes()`` records of the connected cluster's alive nodes."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_resources(node: dict) -> dict:
    """Total CPUs/GPUs of one ``ray.nodes()`` record."""
    return {k: float(node.get("Resources", {}).get(k, 0.0)) for k in ("CPU", "GPU")}


def alive_nodes() -> list[dict]:
    """Total CPUs/GPUs of each alive node of the connected cluster."""
    return [node_resources(n) for n in alive_node_records()]


def largest_node() -> dict:
    """CPUs/GPUs of the biggest alive node, for messages ({} when Ray cannot say)."""
    try:
        nodes = alive_nodes()
    except Exception:
        return {}
    return {k: max(n[k] for n in nodes) for k in ("CPU", "GPU")} if nodes else {}
