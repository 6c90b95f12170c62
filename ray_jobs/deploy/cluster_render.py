"""``diclip cluster render``: fill the cluster templates in ``cluster/`` from a job spec.

Every resource number of a deployment (GPUs, CPUs and memory per worker, how many workers) is derived
here from the spec's stage ``resources`` and ``train`` sections, once, so users never hand-edit the same
numbers in the RayCluster, the RayJob and the cluster-launcher YAML. Templates are loaded and written
with PyYAML (no text templating); the output directory gets:

* ``raycluster.yaml``: KubeRay RayCluster (CPU head + one autoscaling worker group, and with
  ``cluster.cpu_workers.count`` a second, CPU-only group for the evaluate stage's CRF tasks), for ``diclip submit``;
* ``rayjob.yaml``: KubeRay RayJob running the spec on a fresh cluster with the same spec;
* ``spec-configmap.yaml``: the merged spec as a ConfigMap, mounted at ``/app/<name>.yaml`` by the RayJob;
* ``cluster-launcher.yaml``: ``ray up`` config for AWS GPU instances;
* ``<name>.yaml``: the merged spec itself (no credentials: specs never hold any).

Sizing: stages run one after another, so the cluster is sized for the most demanding stage, not the sum.
A worker is as large as the largest single actor (max ``num_gpus``, rounded up; max ``num_cpus``, rounded
up); a stage needs ``ceil(actors / actors_per_worker)`` workers, where ``actors`` is a Ray Data stage's
``concurrency`` or ``train.num_workers``; ``maxReplicas`` is the max over stages and ``minReplicas`` is 0,
so an idle cluster costs only its CPU head. When the evaluate stage runs its dense CRF in CPU tasks
(``evaluate.crf=true``, ``crf_placement=tasks``) and there is no CPU-only group, a worker also gets
:func:`crf_spare_cpus` = max(``CRF_SPARE_CPUS``, ceil(``evaluate.crf_cpus``)) CPUs on top of what its evaluate
actors take, so the CRF tasks run next to the GPUs instead of all on the head. The optional CPU-only group (``cluster.cpu_workers``: count, CPUs,
memory, AWS instance) is not derived: its size is the user's choice of how fast the dense CRF should go
(README "COCO on 8 GPUs"); it autoscales from 0 to ``count`` as well.
"""
from __future__ import annotations

import copy
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from diclip.config import JobSpec, Resources, to_yaml
from diclip.errors import ConfigError
from diclip.logging import get_logger
from ray_jobs import registry
from ray_jobs.deploy.submit import entrypoint, job_overrides, repo_root

log = get_logger("ray_jobs.deploy.cluster_render")

DEFAULT_IMAGE = "diclip:latest"
# Namespace, service account, S3 Secret name and the head's CPUs/memory come from the spec's ``cluster``
# section (diclip.config.ClusterConfig), so a deployment differs from another only in its spec.
MEMORY_GIB_PER_CPU = 4
"""Worker memory request per CPU: the ratio of AWS g5/m5 nodes, and enough for a decoded image batch
plus Ray's object store (which takes ~30% of the container's memory)."""
DEFAULT_REGION = "us-east-1"
APP_DIR = "/app"
"""WORKDIR of cluster/Dockerfile; the RayJob mounts the spec here."""
# AWS instance types the launcher picks from: (name, vCPUs, GPUs). The smallest one that holds the
# largest actor wins; g5 = NVIDIA A10G 24 GB, m5 for CPU-only specs.
AWS_GPU_INSTANCES: tuple[tuple[str, int, int], ...] = (
    ("g5.xlarge", 4, 1), ("g5.2xlarge", 8, 1), ("g5.4xlarge", 16, 1), ("g5.8xlarge", 32, 1),
    ("g5.12xlarge", 48, 4), ("g5.16xlarge", 64, 1), ("g5.24xlarge", 96, 4), ("g5.48xlarge", 192, 8),
)
AWS_CPU_INSTANCES: tuple[tuple[str, int, int], ...] = (
    ("m5.large", 2, 0), ("m5.xlarge", 4, 0), ("m5.2xlarge", 8, 0), ("m5.4xlarge", 16, 0),
    ("m5.8xlarge", 32, 0), ("m5.12xlarge", 48, 0), ("m5.16xlarge", 64, 0), ("m5.24xlarge", 96, 0),
)
AWS_CPU_WORKER_INSTANCES: tuple[tuple[str, int, int], ...] = (
    ("c7i.large", 2, 0), ("c7i.xlarge", 4, 0), ("c7i.2xlarge", 8, 0), ("c7i.4xlarge", 16, 0),
    ("c7i.8xlarge", 32, 0), ("c7i.12xlarge", 48, 0), ("c7i.16xlarge", 64, 0), ("c7i.24xlarge", 96, 0),
    ("c7i.48xlarge", 192, 0),
)
"""(name, vCPUs, GPUs) of ``cluster.cpu_workers`` nodes: compute-optimised (the CRF is pure CPU, ~0.5 GiB per
task), the smallest holding ``cluster.cpu_workers.cpus`` unless ``cluster.cpu_workers.instance`` names one."""
CPU_WORKER_GIB_PER_VCPU = 2
"""Memory per vCPU of the listed c7i types (c7i.48xlarge: 192 vCPU, 384 GiB): the one source of a CPU worker's
default memory (``cluster.cpu_workers.memory_gib=0``)."""
POD_SHARE = 0.9
"""Largest share of a listed node's vCPUs and memory a CPU-worker pod requests: the kubelet, the OS and
DaemonSets keep the rest, so a pod asking for the whole node (cpu "192" on a c7i.48xlarge) never schedules."""
CPU_GROUP = "cpu-only-workers"
"""KubeRay group name (and, with ``_`` for ``-``, launcher node type) of ``cluster.cpu_workers``."""
AWS_HEAD_INSTANCES: tuple[tuple[str, int, int], ...] = (
    ("m5.large", 2, 8), ("m5.xlarge", 4, 16), ("m5.2xlarge", 8, 32), ("m5.4xlarge", 16, 64),
    ("m5.8xlarge", 32, 128), ("m5.12xlarge", 48, 192), ("m5.16xlarge", 64, 256), ("m5.24xlarge", 96, 384),
)
"""(name, vCPUs, GiB) of the launcher head: the smallest holding ``cluster.head_cpus`` and ``head_memory_gib``
(the defaults, 4 / 16, give m5.xlarge)."""
MODELS_VOLUME = "diclip-models"
"""Pod volume name of ``cluster.models_pvc`` (the pre-fetched Hugging Face cache)."""
LAUNCHER_REPO = "."
"""Local side of the launcher's repository file mount: relative, so the rendered file holds no path of the
machine that rendered it; ``ray up`` resolves it against its working directory (the repository root)."""
HEADER = ("# Generated by `diclip cluster render` from job spec {name!r}. Do not edit: change the spec\n"
          "# (stage resources, train.num_workers, storage) and render again.\n")


# ----------------------------------------------------------------------------------------------
# sizing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageDemand:
    """What one stage asks Ray for: ``actors`` actors/workers of ``cpus`` CPUs and ``gpus`` GPUs each."""

    stage: str
    actors: int
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ClusterPlan:
    """Worker shape and count derived from the spec."""

    cpus_per_worker: int
    gpus_per_worker: int
    memory_gib_per_worker: int
    max_workers: int
    sized_by: str
    """Stage that needs the most workers (for logs and docs)."""

    @property
    def gpu(self) -> bool:
        return self.gpus_per_worker > 0


CRF_SPARE_CPUS = 4
"""CPUs a worker gets for the evaluate stage's CRF tasks beyond its actors' (when there is no CPU-only group):
VOC/COCO's 4-CPU evaluate actor then runs on an 8-vCPU g5.2xlarge, with 4 one-CPU CRF tasks beside it."""


def crf_in_tasks(spec: JobSpec) -> bool:
    e = spec.evaluate
    return "evaluate" in spec.pipeline.stages and e.crf_in_tasks


def crf_spare_cpus(spec: JobSpec) -> int:
    """The sizing rule's one source: CPUs each worker gets for CRF tasks on top of its evaluate actors'."""
    if not crf_in_tasks(spec) or spec.cluster.cpu_workers.count:
        return 0
    return max(CRF_SPARE_CPUS, math.ceil(spec.evaluate.crf_cpus - 1e-9))


def actors_per_node(cpus: float, gpus: float, res: Resources) -> int:
    """How many actors of ``res`` a node of ``cpus`` / ``gpus`` can host (at most the pool's size)."""
    fit = math.floor(cpus / res.num_cpus + 1e-9)
    if res.num_gpus > 0:
        fit = min(fit, math.floor(gpus / res.num_gpus + 1e-9))
    return max(0, min(fit, res.concurrency))


def crf_cpus_left(cpus: float, gpus: float, res: Resources) -> float:
    """CPUs a node keeps for CRF tasks once it hosts all the evaluate actors (``res``) it can."""
    return cpus - actors_per_node(cpus, gpus, res) * res.num_cpus


def stage_demands(spec: JobSpec) -> list[StageDemand]:
    """Resource demand of the stages the spec runs (all stages when none of them is a Ray stage)."""
    if spec.train.use_gpu and spec.train.resources.num_gpus <= 0:
        raise ConfigError("train.use_gpu is true but train.resources.num_gpus is 0")
    ray_stages = [s.name for s in registry.STAGES if s.needs_ray]
    chosen = [s for s in spec.pipeline.stages if s in ray_stages]
    # e.g. a synthesize-only demo spec: size for the stages it would run next, not for nothing.
    stages = chosen or ray_stages
    out = []
    for s in stages:
        res: Resources = registry.get(s).settings(spec).resources
        if s == "train":
            gpus = res.num_gpus if spec.train.use_gpu else 0.0  # Ray Train gets no GPU when use_gpu is off
            out.append(StageDemand(s, spec.train.num_workers, res.num_cpus, gpus))
        else:
            out.append(StageDemand(s, res.concurrency, res.num_cpus, res.num_gpus))
    return out


def plan_cluster(spec: JobSpec) -> ClusterPlan:
    """Size one worker for the largest actor, and the worker group for the most demanding stage."""
    demands = stage_demands(spec)
    spare = crf_spare_cpus(spec)
    gpus = max(0, math.ceil(max(d.gpus for d in demands) - 1e-9))
    cpus = max(1, math.ceil(max(d.cpus + (spare if d.stage == "evaluate" else 0) for d in demands) - 1e-9))
    need, sized_by = 0, demands[0].stage
    for d in demands:
        per_worker = math.floor((cpus - (spare if d.stage == "evaluate" else 0)) / d.cpus + 1e-9)
        if d.gpus > 0:
            per_worker = min(per_worker, math.floor(gpus / d.gpus + 1e-9))
        workers = math.ceil(d.actors / max(1, per_worker))
        if workers > need:
            need, sized_by = workers, d.stage
    return ClusterPlan(cpus_per_worker=cpus, gpus_per_worker=gpus, memory_gib_per_worker=cpus * MEMORY_GIB_PER_CPU,
                       max_workers=need, sized_by=sized_by)


def aws_instance(plan: ClusterPlan) -> tuple[str, int, int]:
    """Smallest listed AWS instance (name, vCPUs, GPUs) that holds one worker of the plan."""
    table = AWS_GPU_INSTANCES if plan.gpu else AWS_CPU_INSTANCES
    fits = [t for t in table if t[1] >= plan.cpus_per_worker and t[2] >= plan.gpus_per_worker]
    if not fits:
        raise ConfigError(f"no AWS instance type holds a worker of {plan.cpus_per_worker} CPUs and "
                          f"{plan.gpus_per_worker} GPUs; lower the stages' resources.num_cpus/num_gpus")
    return min(fits, key=lambda t: (t[1], t[2]))


def cpu_worker_instance(spec: JobSpec) -> tuple[str, int]:
    """(AWS instance type, vCPUs) of a ``cluster.cpu_workers`` node; one line when none fits."""
    w = spec.cluster.cpu_workers
    listed = {name: vcpus for name, vcpus, _ in AWS_CPU_WORKER_INSTANCES}
    if w.instance:
        if w.instance in listed and listed[w.instance] < w.cpus:
            raise ConfigError(f"cluster.cpu_workers.instance={w.instance} has {listed[w.instance]} vCPUs, fewer than "
                              f"cluster.cpu_workers.cpus={w.cpus}; name a larger type or lower cpus")
        return w.instance, listed.get(w.instance, w.cpus)
    fits = [(name, vcpus) for name, vcpus, _ in AWS_CPU_WORKER_INSTANCES if vcpus >= w.cpus]
    if not fits:
        name, vcpus, _ = AWS_CPU_WORKER_INSTANCES[-1]
        raise ConfigError(f"cluster.cpu_workers.cpus={w.cpus}: no listed AWS instance type has that many vCPUs (the "
                          f"largest, {name}, has {vcpus}); lower it or name one in cluster.cpu_workers.instance")
    return fits[0]


def cpu_worker_pod(spec: JobSpec) -> tuple[int, int]:
    """(CPUs, GiB) a KubeRay CPU-worker pod requests: ``cpus`` and ``memory_gib`` (0: the node's
    ``CPU_WORKER_GIB_PER_VCPU`` per CPU), at most ``POD_SHARE`` of a listed node; an explicit ``memory_gib``
    above that is one line. (The launcher's node declares all of its vCPUs: no kubelet there.)"""
    w = spec.cluster.cpu_workers
    name, vcpus = cpu_worker_instance(spec)
    if not any(name == n for n, _, _ in AWS_CPU_WORKER_INSTANCES):  # an unlisted type: taken as given
        return w.cpus, w.memory_gib or CPU_WORKER_GIB_PER_VCPU * w.cpus
    cpus = min(w.cpus, math.floor(vcpus * POD_SHARE))
    gib = math.floor(vcpus * CPU_WORKER_GIB_PER_VCPU * POD_SHARE)
    if w.memory_gib > gib:
        raise ConfigError(f"cluster.cpu_workers.memory_gib={w.memory_gib}: a pod on {name} "
                          f"({vcpus * CPU_WORKER_GIB_PER_VCPU} GiB) can get at most {gib} GiB (the rest is the "
                          "node's own); lower it, or 0 for the default")
    return cpus, w.memory_gib or min(gib, CPU_WORKER_GIB_PER_VCPU * cpus)


def check_cpu_workers(spec: JobSpec, plan: ClusterPlan) -> None:
    """One line for a CPU-only group or a CRF task that cannot work: a CRF task larger than every worker."""
    e, w = spec.evaluate, spec.cluster.cpu_workers
    if w.count:
        cpu_worker_pod(spec)
    if crf_in_tasks(spec):
        res = e.resources
        left = crf_cpus_left(plan.cpus_per_worker, plan.gpus_per_worker, res)
        if not w.count and res.num_gpus > 0 and left < e.crf_cpus:
            raise ConfigError(crf_starved_line(e.crf_cpus, f"each worker's {plan.cpus_per_worker} CPUs", left))
        largest = max(plan.cpus_per_worker, cpu_worker_pod(spec)[0] if w.count else 0)
        if e.crf_cpus > largest:
            raise ConfigError(f"evaluate.crf_cpus={e.crf_cpus:g}: each CRF task needs more CPUs than any worker has "
                              f"(the largest has {largest}); lower evaluate.crf_cpus or raise "
                              "cluster.cpu_workers.cpus (with cluster.cpu_workers.count > 0)")


def crf_starved_line(crf_cpus: float, nodes: str, left: float) -> str:
    """The one line for CRF tasks that would all run on the head (render and the joined-cluster check)."""
    return (f"evaluate: each CRF task needs evaluate.crf_cpus={crf_cpus:g} CPUs but {nodes} minus the evaluate "
            f"actors' leave {left:g}, so every CRF would run on the head; set cluster.cpu_workers.count>0 (CPU-only "
            "workers) or evaluate.crf_placement=actor")


# ----------------------------------------------------------------------------------------------
# manifests
# ----------------------------------------------------------------------------------------------
def k8s_name(name: str) -> str:
    """``diclip-<spec name>`` as a DNS-1123 label short enough for KubeRay's derived pod/service names."""
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "job"
    return f"diclip-{base}"[:40].rstrip("-")


def spec_file_name(spec: JobSpec) -> str:
    stem = spec.name if spec.name not in ("raycluster", "rayjob", "cluster-launcher", "spec-configmap") else f"spec-{spec.name}"
    return f"{stem}.yaml"


def _uses_s3(spec: JobSpec) -> bool:
    return any(str(u).startswith("s3://") for u in (spec.output_uri, spec.data.root))


def _storage_env(spec: JobSpec) -> list[dict[str, str]]:
    env = []
    if spec.storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint_url})
        # S3-compatible store: no EC2 metadata probing for credentials/region (pitfall 22).
        env.append({"name": "AWS_EC2_METADATA_DISABLED", "value": "true"})
    if spec.storage.region:
        env += [{"name": "AWS_REGION", "value": spec.storage.region},
                {"name": "AWS_DEFAULT_REGION", "value": spec.storage.region}]
    return env


def _container_resources(cpus: int, memory_gib: int, gpus: int = 0) -> dict[str, dict[str, str]]:
    # requests == limits: Ray sizes itself from the limits, and GPUs must be requested as limits.
    res = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(res), "limits": dict(res)}


def _models_env(spec: JobSpec) -> list[dict[str, str]]:
    """HF_HOME on the pre-fetched model volume, offline: a missing model fails at once, not after a download."""
    home = spec.cluster.models_home
    if not home:
        return []
    return [{"name": "HF_HOME", "value": home}, {"name": "HF_HUB_OFFLINE", "value": "1"}]


def _fill_pod(pod: dict, spec: JobSpec, image: str, env: list[dict], resources: dict, secret_optional: bool) -> None:
    """Image, resources, env, the S3 Secret, the service account and the model volume of one Ray pod."""
    c = spec.cluster
    container = pod["containers"][0]
    container["image"] = image
    container["resources"] = resources
    container["env"] = env + _models_env(spec)
    container["envFrom"] = [{"secretRef": {"name": c.s3_secret, "optional": secret_optional}}]
    if c.service_account:
        pod["serviceAccountName"] = c.service_account
    if c.models_pvc:
        pod.setdefault("volumes", []).append(
            {"name": MODELS_VOLUME, "persistentVolumeClaim": {"claimName": c.models_pvc, "readOnly": True}})
        container.setdefault("volumeMounts", []).append(
            {"name": MODELS_VOLUME, "mountPath": c.models_home, "readOnly": True})


def render_raycluster(spec: JobSpec, plan: ClusterPlan, image: str, template: dict) -> dict:
    import ray

    doc = copy.deepcopy(template)
    name = k8s_name(spec.name)
    doc["metadata"]["name"] = name
    doc["metadata"]["namespace"] = spec.cluster.namespace
    doc["metadata"].setdefault("labels", {})["diclip/job"] = name[len("diclip-"):] or "job"
    cs = doc["spec"]
    cs["rayVersion"] = ray.__version__
    secret_optional = not _uses_s3(spec)  # a local-only spec needs no S3 Secret to start
    env = _storage_env(spec)

    # DeepSpeed picks its accelerator at import; the head has no GPU.
    _fill_pod(cs["headGroupSpec"]["template"]["spec"], spec, image, env + [{"name": "DS_ACCELERATOR", "value": "cpu"}],
              _container_resources(spec.cluster.head_cpus, spec.cluster.head_memory_gib), secret_optional)

    group = cs["workerGroupSpecs"][0]
    group["groupName"] = "gpu-workers" if plan.gpu else "cpu-workers"
    group["minReplicas"] = 0
    group["replicas"] = 0
    group["maxReplicas"] = plan.max_workers
    pod = group["template"]["spec"]
    _fill_pod(pod, spec, image, env + [{"name": "DS_ACCELERATOR", "value": "cuda" if plan.gpu else "cpu"}],
              _container_resources(plan.cpus_per_worker, plan.memory_gib_per_worker, plan.gpus_per_worker),
              secret_optional)
    if plan.gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    else:
        pod.pop("tolerations", None)
    w = spec.cluster.cpu_workers
    if w.count:  # CPU-only nodes for the CRF tasks: the same pod, without GPU and toleration
        cpu_group = copy.deepcopy(template["spec"]["workerGroupSpecs"][0])
        cpu_group.update(groupName=CPU_GROUP, minReplicas=0, replicas=0, maxReplicas=w.count)
        cpu_pod = cpu_group["template"]["spec"]
        cpu_pod.pop("tolerations", None)
        _fill_pod(cpu_pod, spec, image, env + [{"name": "DS_ACCELERATOR", "value": "cpu"}],
                  _container_resources(*cpu_worker_pod(spec)), secret_optional)
        cs["workerGroupSpecs"].append(cpu_group)
    return doc


def render_configmap(spec: JobSpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{k8s_name(spec.name)}-spec", "namespace": spec.cluster.namespace,
                     "labels": {"app.kubernetes.io/name": "diclip"}},
        "data": {spec_file_name(spec): to_yaml(spec)},
    }


def render_rayjob(spec: JobSpec, cluster: dict, template: dict) -> dict:
    doc = copy.deepcopy(template)
    doc["metadata"]["name"] = cluster["metadata"]["name"]
    doc["metadata"]["namespace"] = spec.cluster.namespace
    fname = spec_file_name(spec)
    doc["spec"]["entrypoint"] = entrypoint(f"{APP_DIR}/{fname}", job_overrides(spec), spec.cluster.python)
    cluster_spec = copy.deepcopy(cluster["spec"])
    # The driver runs on the head: only the head mounts the spec (one file, via subPath).
    head_pod = cluster_spec["headGroupSpec"]["template"]["spec"]
    head_pod.setdefault("volumes", []).append(
        {"name": "diclip-spec", "configMap": {"name": f"{k8s_name(spec.name)}-spec"}})
    head_pod["containers"][0].setdefault("volumeMounts", []).append(
        {"name": "diclip-spec", "mountPath": f"{APP_DIR}/{fname}", "subPath": fname, "readOnly": True})
    doc["spec"]["rayClusterSpec"] = cluster_spec
    doc["spec"]["submitterConfig"] = {"backoffLimit": 0}  # the submitter must not rerun with the same id
    doc["spec"]["backoffLimit"] = spec.cluster.job_retries  # a whole new cluster per retry: the run resumes
    return doc


def aws_head_instance(spec: JobSpec) -> str:
    """The smallest listed m5 type with ``cluster.head_cpus`` vCPUs and ``head_memory_gib`` GiB; one line if none."""
    c = spec.cluster
    for name, vcpus, gib in AWS_HEAD_INSTANCES:
        if vcpus >= c.head_cpus and gib >= c.head_memory_gib:
            return name
    name, vcpus, gib = AWS_HEAD_INSTANCES[-1]
    raise ConfigError(f"cluster.head_cpus={c.head_cpus} / cluster.head_memory_gib={c.head_memory_gib}: no AWS head "
                      f"instance type fits (the largest listed, {name}, has {vcpus} vCPUs / {gib} GiB)")


def launcher_env_commands(spec: JobSpec) -> list[str]:
    """Setup commands exporting the weights cache (``cluster.hf_home``) on every launcher node: Ray runs its
    commands in login shells, so ``~/.bashrc`` reaches ``ray start`` and every worker and job it starts."""
    home = spec.cluster.hf_home
    if not home:
        return []
    return [f"echo {shlex.quote(f'export HF_HOME={shlex.quote(home)}')} >> ~/.bashrc",
            "echo 'export HF_HUB_OFFLINE=1' >> ~/.bashrc"]


def render_launcher(spec: JobSpec, plan: ClusterPlan, template: dict) -> dict:
    doc = copy.deepcopy(template)
    doc["cluster_name"] = k8s_name(spec.name)
    doc["max_workers"] = plan.max_workers
    doc["provider"]["region"] = spec.storage.region or DEFAULT_REGION
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    head["node_config"]["InstanceType"] = aws_head_instance(spec)
    head["resources"] = {"CPU": spec.cluster.head_cpus}
    worker_key = next(k for k in types if k != doc["head_node_type"])
    worker = types.pop(worker_key)
    itype, vcpus, gpus = aws_instance(plan)
    worker["node_config"]["InstanceType"] = itype
    # Declare what the instance really has, so the autoscaler's bin-packing matches the node.
    worker["resources"] = {"CPU": vcpus, "GPU": gpus} if gpus else {"CPU": vcpus}
    worker["min_workers"] = 0
    worker["max_workers"] = plan.max_workers
    types["gpu_worker" if plan.gpu else "cpu_worker"] = worker
    w = spec.cluster.cpu_workers
    if w.count:
        cpu_type, cpu_vcpus = cpu_worker_instance(spec)
        cpu_node = copy.deepcopy(worker)
        cpu_node["node_config"]["InstanceType"] = cpu_type
        cpu_node["resources"] = {"CPU": cpu_vcpus}
        cpu_node["max_workers"] = w.count
        types[CPU_GROUP.replace("-", "_")] = cpu_node
        doc["max_workers"] = plan.max_workers + w.count
    doc["file_mounts"] = {"~/diclip": LAUNCHER_REPO}
    # install into the interpreter the job will run (cluster.python), not some other python on the node
    py = shlex.quote(spec.cluster.python)
    doc["setup_commands"] = [re.sub(r"^python3 ", f"{py} ", cmd) for cmd in doc.get("setup_commands", [])] \
        + launcher_env_commands(spec)
    return doc


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes multi-line strings (the spec in the ConfigMap) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def _dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _load_template(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"cluster template not found: {path}; render from a checkout of the repository")
    return yaml.safe_load(path.read_text())


def render_all(spec: JobSpec, out_dir: str, image: Optional[str] = None) -> list[str]:
    """Write the manifests and the merged spec into ``out_dir``; returns the written paths."""
    from ray_jobs.validate import check_cluster_uris

    check_cluster_uris(spec)  # before anything is written: a relative or node-local path loses the outputs
    aws_head_instance(spec)  # a head no listed instance holds: one line before the plan is logged
    templates = repo_root() / "cluster"
    plan = plan_cluster(spec)
    check_cpu_workers(spec, plan)
    image = image or DEFAULT_IMAGE
    log.info("cluster for %r: workers of %d CPU / %d GPU / %d GiB, 0..%d of them (sized by stage %s)",
             spec.name, plan.cpus_per_worker, plan.gpus_per_worker, plan.memory_gib_per_worker,
             plan.max_workers, plan.sized_by)
    if spec.cluster.cpu_workers.count:
        w = spec.cluster.cpu_workers
        log.info("cluster for %r: and 0..%d CPU-only workers: pods of %d CPU / %d GiB on KubeRay, %s (%d CPU) on "
                 "AWS", spec.name, w.count, *cpu_worker_pod(spec), cpu_worker_instance(spec)[0], w.cpus)

    cluster = render_raycluster(spec, plan, image, _load_template(templates / "kuberay" / "raycluster.yaml"))
    docs = {
        "raycluster.yaml": cluster,
        "rayjob.yaml": render_rayjob(spec, cluster, _load_template(templates / "kuberay" / "rayjob.yaml")),
        "spec-configmap.yaml": render_configmap(spec),
        "cluster-launcher.yaml": render_launcher(spec, plan, _load_template(templates / "aws" / "cluster-launcher.yaml")),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    header = HEADER.format(name=spec.name)
    for fname, doc in docs.items():
        path = out / fname
        path.write_text(header + _dump(doc))
        paths.append(str(path))
    spec_path = out / spec_file_name(spec)
    spec_path.write_text(header + to_yaml(spec))
    paths.append(str(spec_path))
    return paths
