"""After joining a cluster: refuse, in one line, a stage the cluster can never host.

``validate`` checks a plan against the local machine (:func:`ray_jobs.validate.check_resources`); a run
that joins a cluster (``ray.address``, or a submitted job) cannot be checked before it joins, and a stage
whose actors no node can ever host used to wait ``ray.stall_minutes`` (30) for the stall watchdog. Here
each stage's request is compared with what the cluster can ever offer:

* its alive nodes (``ray.nodes()``) and totals (``ray.cluster_resources()``);
* when the autoscaler published its node types (the GCS cluster config, what Ray Data itself reads):
  those types too, so a GPU stage on an autoscaling cluster that starts with 0 GPUs is not refused;
* otherwise, whether an autoscaler with a real config runs at all (autoscaler v2's flag, or v1's status
  report, whose node types are ``node_<id>`` mirrors on a manually started cluster). With one, node types
  are unknown: the run logs one line and waits (up to ``ray.stall_minutes``) for it to add nodes.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from diclip.config import JobSpec
from diclip.errors import ConfigError
from diclip.logging import get_logger
from ray_jobs import registry
from ray_jobs.runtime import ray_compat

log = get_logger("ray_jobs.deploy.cluster_fit")

STATUS_WAIT_S = 12.0
"""How long to wait for the v1 autoscaler's first status report (written every 5 s) on a fresh cluster."""
READONLY_PREFIX = "node_"
"""Node-type names of the v1 monitor's read-only mirror of a manually started cluster (no autoscaling)."""


@dataclass
class ClusterView:
    """What a cluster offers now, and what its autoscaler could add."""

    nodes: list[dict] = field(default_factory=list)
    """Total CPU/GPU of each alive node."""
    total: dict = field(default_factory=dict)
    node_types: list[dict] | None = None
    """Resources of each node type the autoscaler may launch; None: not published."""
    autoscaling: bool = False
    """An autoscaler that can add nodes runs (node types unknown unless :attr:`node_types`)."""
    heads: list[bool] = field(default_factory=list)
    """Which of :attr:`nodes` is the head (missing: not the head)."""

    def workers(self) -> list[dict]:
        """The alive nodes other than the head."""
        return [n for i, n in enumerate(self.nodes) if not (i < len(self.heads) and self.heads[i])]

    def largest(self) -> dict:
        return {k: max((n.get(k, 0.0) for n in self.nodes), default=0.0) for k in ("CPU", "GPU")}


def _fits(want: dict, node: dict) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in want.items())


def _autoscaler_runs() -> bool | None:
    """True: an autoscaler with a real config; False: none, or the read-only mirror; None: cannot tell."""
    import ray

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
    except Exception:
        pass
    deadline = time.monotonic() + STATUS_WAIT_S
    while True:  # the monitor reports every 5 s, and only once it has load metrics: wait for a report
        types = _reported_node_types()
        if types:
            return not all(t.startswith(READONLY_PREFIX) for t in types)
        if time.monotonic() > deadline or not ray.is_initialized():
            return None
        time.sleep(1.0)


def _reported_node_types() -> set[str]:
    """Node-type names in the v1 autoscaler's last status report (empty: no report yet)."""
    report = ray_compat.autoscaler_status_report().get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    types |= {t for _, t, *_ in report.get("pending_nodes") or []} | {t for _, t in report.get("failed_nodes") or []}
    return types


def cluster_view() -> ClusterView:
    """What the joined cluster offers (Ray must be initialised)."""
    import ray

    from ray_jobs.runtime.ray_session import alive_node_records, node_resources

    records = alive_node_records()  # one listing: which node is the head is read from the same records
    nodes = [node_resources(n) for n in records]
    heads = [ray_compat.is_head(n) for n in records]
    total = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    types, grows = ray_compat.published_node_types()
    autoscaling = grows if types is not None else _autoscaler_runs() is not False
    return ClusterView(nodes=nodes, total=total, node_types=types, autoscaling=autoscaling, heads=heads)


def check_crf_hosts(spec: JobSpec, view: ClusterView) -> None:
    """One line when GPU evaluate actors leave no worker node (or node type) ``evaluate.crf_cpus`` CPUs: every
    CRF task would run on the head. Judged only when the nodes to come are known (published node types, or
    no autoscaler) and there are workers (a one-node cluster is :func:`check_resources`' case). A node type
    without GPUs counts as a CRF host (it may be the head's type: the check then errs towards running)."""
    from ray_jobs.deploy.cluster_render import crf_cpus_left, crf_starved_line

    e = spec.evaluate
    res = e.resources
    if not (e.crf_in_tasks and res.num_gpus > 0):
        return
    if view.node_types is None and view.autoscaling:
        return
    hosts = view.workers() + (view.node_types or [])
    if not hosts:
        return
    lefts = [crf_cpus_left(n.get("CPU", 0.0), n.get("GPU", 0.0), res) for n in hosts]
    if max(lefts) < e.crf_cpus:
        raise ConfigError(crf_starved_line(e.crf_cpus, "every worker node's CPUs", max(lefts)))


def stage_request(spec: JobSpec, stage: str) -> tuple[dict, int, str]:
    """(what one actor or worker asks for, how many of them, what they are called)."""
    res = registry.get(stage).settings(spec).resources
    if stage == "train":
        t = spec.train
        return {"CPU": res.num_cpus, **({"GPU": max(1.0, res.num_gpus)} if t.use_gpu else {})}, t.num_workers, \
            "worker"
    return {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus > 0 else {})}, res.concurrency, "actor"


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in d.items()) + "}"


def check_cluster(spec: JobSpec, stages: list[str], view: ClusterView) -> list[str]:
    """Refuse (one-line :class:`ConfigError`) a stage the cluster can never host; return notes for stages
    that wait for its autoscaler."""
    from ray_jobs.validate import check_resources

    notes = []
    minutes = spec.ray.stall_minutes
    for stage in stages:
        if not registry.get(stage).needs_ray:
            continue
        want, count, unit = stage_request(spec, stage)
        crf = {"CPU": spec.evaluate.crf_cpus}
        if stage == "evaluate" and spec.evaluate.crf_in_tasks \
                and not any(_fits(crf, n) for n in view.nodes + (view.node_types or [])) \
                and (view.node_types is not None or not view.autoscaling):
            raise ConfigError(f"evaluate: each CRF task asks for {_fmt(crf)} but the cluster's largest node has "
                              f"{_fmt(view.largest())}" + (" and none of its autoscaler's node types has it"
                                                            if view.node_types is not None else "")
                              + "; lower evaluate.crf_cpus, or set evaluate.crf_placement=actor")
        if stage == "evaluate":
            check_crf_hosts(spec, view)
        if any(_fits(want, n) for n in view.nodes):
            if not view.autoscaling:  # a fixed cluster: the whole pool and its input tasks must fit too
                sub = dataclasses.replace(spec, pipeline=dataclasses.replace(spec.pipeline, stages=[stage]))
                check_resources(sub, view.total.get("CPU", 0.0), view.total.get("GPU", 0.0), where="the cluster")
            continue
        gpu = "GPU" in want and not any(n.get("GPU", 0.0) for n in view.nodes)
        lacking = "the cluster has no GPU" if gpu else f"its largest node has {_fmt(view.largest())}"
        fix = (f"set {stage}.resources.num_gpus=0 (CPU){' and train.use_gpu=false' if stage == 'train' else ''}, "
               "or join a cluster with GPU nodes") if gpu else \
            f"lower {stage}.resources.num_cpus, or join a cluster with bigger nodes"
        if view.node_types is not None:
            if any(_fits(want, t) for t in view.node_types):
                notes.append(f"{stage}: each {unit} asks for {_fmt(want)} and {lacking} now; waiting (up to "
                             f"ray.stall_minutes={minutes:g}) for the autoscaler to add a node type that has it")
                continue
            raise ConfigError(f"{stage}: each {unit} asks for {_fmt(want)} but {lacking} and none of its "
                              f"autoscaler's node types ({', '.join(_fmt(t) for t in view.node_types)}) has it; "
                              f"{fix}")
        if view.autoscaling:
            notes.append(f"{stage}: each {unit} asks for {_fmt(want)} and {lacking} now; waiting (up to "
                         f"ray.stall_minutes={minutes:g}) for the cluster's autoscaler to add such a node")
            continue
        raise ConfigError(f"{stage}: each {unit} asks for {_fmt(want)} but {lacking} and no autoscaler to add "
                          f"one, so it would wait forever; {fix}")
    return notes


def check_joined_cluster(spec: JobSpec, stages: list[str]) -> None:
    """:func:`check_cluster` against the cluster this process joined; logs the waiting notes."""
    for note in check_cluster(spec, stages, cluster_view()):
        log.info("note: %s", note)
