"""Cluster deployment: rendered manifests against real schemas, the Jobs submission path, and one real
submission to a local Ray cluster.

Schemas: the KubeRay CRDs in ``tests/assets/kuberay/`` (public ``ray.io_rayclusters.yaml`` /
``ray.io_rayjobs.yaml``, controller-gen v0.16.5, vendored as test data) and Ray's own autoscaler schema
``ray/autoscaler/ray-schema.json`` from the installed ray package.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import diclip  # noqa: F401  (torchvision shim before anything heavy)

import jsonschema
import pytest
import yaml

from diclip import cli
from diclip.config import load_spec
from diclip.errors import ConfigError, DiclipError
from ray_jobs.deploy import cluster_render, submit
from tests.multinode import free_port, session_pids

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
SECRET_VALUE = "sekrit-Zq9x-do-not-leak"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def crd(kind: str) -> tuple[dict, dict]:
    """(CRD document, v1 openAPIV3Schema) for a KubeRay kind."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 1.4 MB of YAML: libyaml when present
    doc = yaml.load((ASSETS / CRD_FILES[kind]).read_text(), Loader=loader)
    v1 = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
    return doc, v1["schema"]["openAPIV3Schema"]


def validate_k8s(obj: dict) -> None:
    """Validate a whole object (apiVersion, kind, metadata, spec) against its CRD's v1 schema."""
    doc, schema = crd(obj["kind"])
    assert obj["apiVersion"] == f"{doc['spec']['group']}/v1"
    assert obj["kind"] == doc["spec"]["names"]["kind"]
    # OpenAPI v3 keywords (nullable, x-kubernetes-*) are unknown to JSON Schema and ignored.
    jsonschema.Draft7Validator(schema).validate(obj)


@functools.lru_cache(maxsize=None)
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


BUCKET = "s3://diclip-test"


def shared(config: str, *overrides: str) -> list[str]:
    """Overrides putting a spec's outputs and data in a bucket (rendering refuses node-local paths)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    base = [f"output_uri={BUCKET}/runs/{config}", f"data.root={BUCKET}/datasets/{config}"]
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(overrides)


def render(tmp_path: Path, config: str, *overrides: str, image: str | None = None) -> dict[str, Path]:
    spec = load_spec(str(CONFIGS / f"{config}.yaml"), shared(config, *overrides), absolute_paths=False)
    paths = cluster_render.render_all(spec, str(tmp_path / config), image=image)
    return {Path(p).name: Path(p) for p in paths}


def containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["containers"]]


# ----------------------------------------------------------------------------------------------
# rendered manifests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["demo", "coco"])
def test_rendered_kuberay_manifests_validate_against_crds(tmp_path: Path, config: str) -> None:
    files = render(tmp_path, config)
    spec = load_spec(str(CONFIGS / f"{config}.yaml"), shared(config))
    assert set(files) == {"raycluster.yaml", "rayjob.yaml", "spec-configmap.yaml", "cluster-launcher.yaml",
                          f"{spec.name}.yaml"}
    cluster, job = load(files["raycluster.yaml"]), load(files["rayjob.yaml"])
    validate_k8s(cluster)
    validate_k8s(job)

    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    js = job["spec"]
    assert js["shutdownAfterJobFinishes"] is True
    assert js["submitterConfig"]["backoffLimit"] == 0  # pitfall 16: no retries with the same id
    assert js["backoffLimit"] == spec.cluster.job_retries == 3  # a failed job runs again on a new cluster
    assert isinstance(js["ttlSecondsAfterFinished"], int)
    assert shlex.split(js["entrypoint"]) == ["python", "-m", "ray_jobs.deploy.launch", "run", f"/app/{spec.name}.yaml",
                                             "ray.address=auto"]
    assert cluster["metadata"]["namespace"] == job["metadata"]["namespace"] == "default"
    # the RayJob's cluster is the RayCluster plus the spec mount on the head
    rcs = copy.deepcopy(js["rayClusterSpec"])
    head = rcs["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"].pop()
    vol = head["volumes"].pop()
    assert mount == {"name": "diclip-spec", "mountPath": f"/app/{spec.name}.yaml", "subPath": f"{spec.name}.yaml",
                     "readOnly": True}
    cm = load(files["spec-configmap.yaml"])
    assert vol["configMap"]["name"] == cm["metadata"]["name"] and cm["kind"] == "ConfigMap"
    assert rcs == cluster["spec"]
    # the mounted spec is the merged spec and loads back to the same values
    assert yaml.safe_load(cm["data"][f"{spec.name}.yaml"]) == yaml.safe_load(files[f"{spec.name}.yaml"].read_text())
    reloaded = load_spec(str(files[f"{spec.name}.yaml"]))
    assert reloaded == spec

    for c in containers(cluster["spec"]):
        assert c["image"] == "diclip:latest"
        assert c["envFrom"][0]["secretRef"]["name"] == "diclip-s3"  # credentials only via the Secret
        names = {e["name"] for e in c.get("env", [])}
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def test_coco_resources_come_from_the_spec(tmp_path: Path) -> None:
    files = render(tmp_path, "coco")
    cluster = load(files["raycluster.yaml"])
    head_c = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]  # CPU-only head
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 16)  # concurrency 16 x 1 GPU, 1 GPU/worker
    worker = group["template"]["spec"]["containers"][0]
    for part in ("requests", "limits"):
        assert worker["resources"][part]["nvidia.com/gpu"] == "1"
        assert worker["resources"][part]["cpu"] == "8"  # train.resources.num_cpus: the largest actor
        assert worker["resources"][part]["memory"] == f"{8 * cluster_render.MEMORY_GIB_PER_CPU}Gi"
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"

    launcher = load(files["cluster-launcher.yaml"])
    assert launcher["max_workers"] == 16
    w = launcher["available_node_types"]["gpu_worker"]
    assert w["resources"] == {"CPU": 8, "GPU": 1} and w["node_config"]["InstanceType"] == "g5.2xlarge"
    assert (w["min_workers"], w["max_workers"]) == (0, 16)
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert "GPU" not in head["resources"]


def test_worker_count_follows_gpu_packing(tmp_path: Path) -> None:
    # 0.5 GPU per actor: two actors share a 1-GPU worker, so 16 actors need 8 workers; train needs 8.
    overrides = [f"{s}.resources.num_gpus=0.5" for s in ("generate", "mask", "cache", "correlate", "evaluate")]
    overrides += [f"{s}.resources.num_cpus=2" for s in ("generate", "mask", "cache", "correlate", "evaluate")]
    plan = cluster_render.plan_cluster(load_spec(str(CONFIGS / "coco-8gpu.yaml"), overrides))
    assert (plan.gpus_per_worker, plan.cpus_per_worker, plan.max_workers) == (1, 8, 8)
    plan = cluster_render.plan_cluster(load_spec(str(CONFIGS / "coco-8gpu.yaml"), ["train.num_workers=24"]))
    assert (plan.max_workers, plan.sized_by) == (24, "train")
    plan = cluster_render.plan_cluster(load_spec(str(CONFIGS / "coco-8gpu.yaml"), ["pipeline.stages=[train]",
                                                                              "train.resources.num_gpus=2"]))
    assert (plan.gpus_per_worker, plan.max_workers) == (2, 8)


def test_demo_resources_match_an_independent_count(tmp_path: Path) -> None:
    spec = load_spec(str(CONFIGS / "demo.yaml"), shared("demo"))
    files = render(tmp_path, "demo")
    # recompute from the spec without the renderer's code
    ray_stages = [s for s in ("generate", "mask", "cache", "correlate", "train", "evaluate", "infer")
                  if s in spec.pipeline.stages] or ["generate", "mask", "cache", "correlate", "train", "evaluate",
                                                     "infer"]
    res = {s: getattr(spec, s).resources for s in ray_stages}
    gpus = math.ceil(max(r.num_gpus if s != "train" or spec.train.use_gpu else 0 for s, r in res.items()))
    cpus = max(1, math.ceil(max(r.num_cpus for r in res.values())))
    workers = max(math.ceil((spec.train.num_workers if s == "train" else r.concurrency) / (cpus // r.num_cpus))
                  for s, r in res.items())
    # the dense CRF runs in CPU tasks after the evaluate actors: with no CPU-only group each worker gets
    # max(4, crf_cpus) CPUs beyond its actors' (README, Clusters), not counted when packing actors
    e = spec.evaluate
    crf_tasks = "evaluate" in ray_stages and e.crf_in_tasks and not spec.cluster.cpu_workers.count
    spare = max(4, math.ceil(e.crf_cpus)) if crf_tasks else 0
    cluster = load(files["raycluster.yaml"])
    (group,) = cluster["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["maxReplicas"] == workers and group["minReplicas"] == 0
    assert spare == 4 and limits["cpu"] == str(cpus + spare)
    assert limits.get("nvidia.com/gpu", "0") == str(gpus)
    if gpus == 0:
        assert group["groupName"] == "cpu-workers" and "tolerations" not in group["template"]["spec"]


@pytest.mark.parametrize("config", ["demo", "coco"])
def test_cluster_launcher_validates_against_ray_schema(tmp_path: Path, config: str) -> None:
    launcher = load(render(tmp_path, config)["cluster-launcher.yaml"])
    jsonschema.validate(launcher, ray_schema())
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # pragma: no cover - private API moved
        pytest.skip("ray.autoscaler._private.util.validate_config not importable")
    validate_config(copy.deepcopy(launcher))  # what `ray up` checks, before and after defaults
    validate_config(prepare_config(copy.deepcopy(launcher)))
    assert launcher["file_mounts"] == {"~/diclip": "."}  # `ray up` from the repository root
    text = render(tmp_path, config)["cluster-launcher.yaml"].read_text()
    assert str(REPO) not in text and str(tmp_path) not in text and os.path.expanduser("~") not in text
    assert launcher["max_workers"] >= max(t.get("max_workers", 0) for t in launcher["available_node_types"].values())


def test_broken_manifests_fail_schema_validation(tmp_path: Path) -> None:
    """The schema checks above can fail: drop required fields, use wrong types."""
    files = render(tmp_path, "coco")
    cluster, job = load(files["raycluster.yaml"]), load(files["rayjob.yaml"])

    bad = copy.deepcopy(cluster)
    del bad["spec"]["headGroupSpec"]["template"]
    with pytest.raises(jsonschema.ValidationError, match="'template' is a required property"):
        validate_k8s(bad)
    bad = copy.deepcopy(cluster)
    del bad["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        validate_k8s(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["submitterConfig"]["backoffLimit"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(bad)
    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    with pytest.raises(jsonschema.ValidationError, match="containers"):
        validate_k8s(bad)

    launcher = load(files["cluster-launcher.yaml"])
    bad = copy.deepcopy(launcher)
    del bad["provider"]
    with pytest.raises(jsonschema.ValidationError, match="provider"):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # resources must be integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def test_use_gpu_without_gpus_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = load_spec(str(CONFIGS / "coco.yaml"), shared("coco", "train.resources.num_gpus=0"))
    with pytest.raises(ConfigError) as e:
        cluster_render.render_all(spec, str(tmp_path / "out"))
    assert str(e.value) == "train.use_gpu is true but train.resources.num_gpus is 0"
    assert not (tmp_path / "out").exists()  # nothing half-written
    rc = cli.main(["cluster", "render", str(CONFIGS / "coco.yaml"), *shared("coco", "train.resources.num_gpus=0"),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == "error: train.use_gpu is true but train.resources.num_gpus is 0"


def test_storage_settings_and_image_reach_every_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + SECRET_VALUE)
    out = tmp_path / "r"
    rc = cli.main(["cluster", "render", str(CONFIGS / "coco.yaml"), "output_uri=s3://bucket/coco",
                   "data.root=s3://bucket/MSCOCO2014",
                   "storage.endpoint_url=http://minio:9000", "storage.region=eu-west-1",
                   "--out", str(out), "--image", "registry.example/diclip:1.2"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(p.name for p in out.iterdir())
    cluster = load(out / "raycluster.yaml")
    for c in containers(cluster["spec"]):
        assert c["image"] == "registry.example/diclip:1.2"
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"] == "eu-west-1"
        assert c["envFrom"] == [{"secretRef": {"name": "diclip-s3", "optional": False}}]  # s3:// needs it
    validate_k8s(cluster)
    assert load(out / "cluster-launcher.yaml")["provider"]["region"] == "eu-west-1"
    for f in out.iterdir():
        assert SECRET_VALUE not in f.read_text(), f"credential leaked into {f.name}"


def test_cluster_section_of_the_spec_reaches_every_pod(tmp_path: Path) -> None:
    """Namespace, service account, S3 Secret, head size and the model volume come from spec.cluster."""
    files = render(tmp_path, "coco", "cluster.namespace=vision", "cluster.service_account=diclip-runner",
                   "cluster.s3_secret=team-s3", "cluster.head_cpus=2", "cluster.head_memory_gib=8",
                   "cluster.models_pvc=hf-models", "cluster.hf_home=/mnt/hf", "cluster.python=/opt/venv/bin/python")
    cluster, job, cm = (load(files[f]) for f in ("raycluster.yaml", "rayjob.yaml", "spec-configmap.yaml"))
    validate_k8s(cluster)
    validate_k8s(job)
    assert {d["metadata"]["namespace"] for d in (cluster, job, cm)} == {"vision"}
    assert shlex.split(job["spec"]["entrypoint"])[:3] == ["/opt/venv/bin/python", "-m", "ray_jobs.deploy.launch"]
    for cs in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        pods = [cs["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cs["workerGroupSpecs"]]
        for pod in pods:
            assert pod["serviceAccountName"] == "diclip-runner"
            assert {"name": "diclip-models", "persistentVolumeClaim": {"claimName": "hf-models", "readOnly": True}} \
                in pod["volumes"]
            c = pod["containers"][0]
            assert {"name": "diclip-models", "mountPath": "/mnt/hf", "readOnly": True} in c["volumeMounts"]
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["HF_HOME"] == "/mnt/hf" and env["HF_HUB_OFFLINE"] == "1"
            assert c["envFrom"] == [{"secretRef": {"name": "team-s3", "optional": False}}]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    launcher = load(files["cluster-launcher.yaml"])
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 2} and head["node_config"]["InstanceType"] == "m5.large"  # 2 vCPU / 8 GiB
    assert all(cmd.startswith("/opt/venv/bin/python -m pip") for cmd in launcher["setup_commands"][:3])
    # the weights cache on every launcher node: ~/.bashrc (Ray's login shells) reaches ray start and its workers
    bashrc = _launcher_bashrc(launcher["setup_commands"])
    assert bashrc["HF_HOME"] == "/mnt/hf" and bashrc["HF_HUB_OFFLINE"] == "1" and bashrc["DS_ACCELERATOR"] == "cuda"
    # defaults: no service account, no model volume, the Secret named in the README, no weights cache
    plain_files = render(tmp_path / "plain", "coco")
    plain = load(plain_files["raycluster.yaml"])
    pod = plain["spec"]["headGroupSpec"]["template"]["spec"]
    assert "serviceAccountName" not in pod and all(v["name"] != "diclip-models" for v in pod["volumes"])
    assert pod["containers"][0]["envFrom"][0]["secretRef"]["name"] == "diclip-s3"
    assert not {"HF_HOME", "HF_HUB_OFFLINE"} & {e["name"] for e in pod["containers"][0]["env"]}
    plain_launcher = load(plain_files["cluster-launcher.yaml"])
    assert plain_launcher["available_node_types"]["head"]["node_config"]["InstanceType"] == "m5.xlarge"  # 4 / 16
    assert "HF_HOME" not in _launcher_bashrc(plain_launcher["setup_commands"])
    # a PVC without hf_home mounts at /models/hf; hf_home without a PVC (weights baked into the image, an EFS
    # mount) sets the variables without a volume
    pvc = load(render(tmp_path / "pvc", "coco", "cluster.models_pvc=hf-models")["raycluster.yaml"])
    c = pvc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "diclip-models", "mountPath": "/models/hf", "readOnly": True} in c["volumeMounts"]
    assert {"name": "HF_HOME", "value": "/models/hf"} in c["env"]
    efs = render(tmp_path / "efs", "coco", "cluster.hf_home=/efs/hf", "cluster.head_cpus=6")
    c = load(efs["raycluster.yaml"])["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_HOME", "value": "/efs/hf"} in c["env"]
    assert all(m["name"] != "diclip-models" for m in c.get("volumeMounts", []))
    efs_launcher = load(efs["cluster-launcher.yaml"])
    assert _launcher_bashrc(efs_launcher["setup_commands"])["HF_HOME"] == "/efs/hf"
    assert efs_launcher["available_node_types"]["head"]["node_config"]["InstanceType"] == "m5.2xlarge"  # 6 CPUs


def _launcher_bashrc(commands: list[str]) -> dict[str, str]:
    """The variables the launcher's setup commands append to ~/.bashrc, as a login shell would see them."""
    found = {}
    for cmd in commands:
        words = shlex.split(cmd)
        if words[:1] == ["echo"] and words[-2:] == [">>", "~/.bashrc"]:
            (line,) = words[1:-2]
            key, _, value = line.removeprefix("export ").partition("=")
            found[key] = shlex.split(value)[0]
    return found


def test_a_head_no_listed_instance_fits_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(["cluster", "render", str(CONFIGS / "coco.yaml"), *S3_ROOTS, "cluster.head_cpus=128",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: cluster.head_cpus=128 / cluster.head_memory_gib=16: no AWS head instance type "
                               "fits (the largest listed, m5.24xlarge, has 96 vCPUs / 384 GiB)"]


@pytest.mark.parametrize("override, needle", [
    ("cluster.namespace=Team_A", "cluster.namespace 'Team_A' must be a Kubernetes name"),
    ("cluster.head_cpus=0", "cluster.head_cpus and cluster.head_memory_gib must be >= 1"),
    ("cluster.hf_home=models", "cluster.hf_home must be an absolute path"),
])
def test_bad_cluster_settings_are_one_line(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_spec(str(CONFIGS / "coco.yaml"), [override])


S3_ROOTS = ["output_uri=s3://b/coco", "data.root=s3://b/MSCOCO2014"]
LOCAL = "is a local path, which on a cluster is each node's own disk"


@pytest.mark.parametrize("overrides, needle", [
    (["output_uri=runs/coco", "data.root=s3://b/coco"],
     "output_uri='runs/coco' is a relative path: on a cluster it lands in Ray's temporary copy"),
    (["output_uri=s3://b/coco", "data.root=data/MSCOCO2014"], "data.root='data/MSCOCO2014' is a relative path"),
    (["output_uri=/mnt/runs/coco", "data.root=s3://b/coco"], f"output_uri='/mnt/runs/coco' {LOCAL}"),
    # every URI field of diclip.config.URI_FIELDS, not only the two roots
    ([*S3_ROOTS, "data.classes_file=/home/me/shapes.yaml"], f"data.classes_file='/home/me/shapes.yaml' {LOCAL}"),
    ([*S3_ROOTS, "data.classes_file=shapes.yaml"], "data.classes_file='shapes.yaml' is a relative path"),
    ([*S3_ROOTS, "pipeline.stages=[train,infer]", "infer.input=/home/me/pics"], f"infer.input='/home/me/pics' {LOCAL}"),
    ([*S3_ROOTS, "correlate.output=/scratch/corr"], f"correlate.output='/scratch/corr' {LOCAL}"),
    ([*S3_ROOTS, "train.resume_from=ckpt/step_100"], "train.resume_from='ckpt/step_100' is a relative path"),
    ([*S3_ROOTS, "evaluate.checkpoint=file:///home/me/export"], f"evaluate.checkpoint='file:///home/me/export' {LOCAL}"),
    ([*S3_ROOTS, "mask.images=/data/generated"], f"mask.images='/data/generated' {LOCAL}"),
])
def test_render_refuses_paths_a_cluster_would_lose(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   overrides: list[str], needle: str) -> None:
    out = tmp_path / "out"
    rc = cli.main(["cluster", "render", str(CONFIGS / "coco.yaml"), *overrides, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {needle}"), err
    assert not out.exists()
    if needle.endswith(LOCAL) or LOCAL in needle:  # a filesystem every node mounts at that path is fine
        assert cli.main(["cluster", "render", str(CONFIGS / "coco.yaml"), *overrides,
                         "cluster.shared_filesystem=true", "--out", str(out)]) == 0


@pytest.mark.parametrize("overrides", [
    ["model.diffusion.source=/models/sd21-base", "generate.source=/models/sd15"],  # a mounted volume (PVC, EFS)
    ["model.clip.pretrained=/models/clip/vit_b16.safetensors"],
    ["infer.input=/home/me/pics"],  # coco.yaml does not infer: infer.input is not read
])
def test_render_accepts_local_models_and_settings_of_stages_that_do_not_run(tmp_path: Path, overrides: list[str]) -> None:
    assert cli.main(["cluster", "render", str(CONFIGS / "coco.yaml"), *S3_ROOTS, *overrides,
                     "--out", str(tmp_path / "out")]) == 0


def test_submit_refuses_outputs_that_stay_in_the_working_dir_copy(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Checked before the cluster is contacted (the address here answers nothing)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = cli.main(["submit", str(CONFIGS / "demo.yaml"), "--address", "http://127.0.0.1:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: output_uri='runs/demo' is a relative path: on a cluster it lands in Ray's "
                               "temporary copy of the working directory and is lost when the job ends; use "
                               "output_uri=s3://bucket/prefix"]


def test_a_module_missing_on_the_cluster_is_one_line() -> None:
    """The job's interpreter without diclip's dependencies (here: site-packages off with -S)."""
    r = subprocess.run([sys.executable, "-S", "-m", "ray_jobs.deploy.launch", "run", "configs/demo.yaml"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {sys.executable} on the cluster has no module ")
    assert "cluster.python=/path/to/venv/bin/python" in lines[0] and "Traceback" not in r.stderr


def test_k8s_names_are_dns_labels() -> None:
    assert cluster_render.k8s_name("coco") == "diclip-coco"
    name = cluster_render.k8s_name("My_Run.v2-" + "x" * 80)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40


# ----------------------------------------------------------------------------------------------
# submission: unit tests
# ----------------------------------------------------------------------------------------------
def test_runtime_env_excludes_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-must-not-travel")
    spec = load_spec(str(CONFIGS / "demo.yaml"), ["storage.endpoint_url=http://minio:9000"])
    env = submit.runtime_env(spec)
    assert Path(env["working_dir"]) == REPO
    assert (REPO / "diclip").is_dir() and (REPO / "ray_jobs").is_dir()
    for pattern in (".git", ".venv", "/runs", "/data", "/.torch_extensions", "*.safetensors", "__pycache__",
                    "/bench/results"):
        assert pattern in env["excludes"]
    ev = env["env_vars"]
    assert ev["AWS_ACCESS_KEY_ID"] == "AKIATESTKEY" and ev["AWS_SECRET_ACCESS_KEY"] == SECRET_VALUE
    assert ev["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert ev["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"  # the driver's ray.init repeats these env vars
    assert not any(k.startswith("RAY_AUTH") for k in ev)  # the Ray token is the client's, not the job's


def test_upload_package_is_small_and_keeps_the_packages(tmp_path: Path) -> None:
    """Zip the working dir exactly as Ray will (same matcher, same .gitignore handling)."""
    try:
        from ray._private.runtime_env.packaging import _zip_files
    except ImportError:  # pragma: no cover - private API moved
        pytest.skip("ray packaging internals not importable")
    out = tmp_path / "pkg.zip"
    _zip_files(str(REPO), list(submit.EXCLUDES), str(out), include_gitignore=True)
    names = zipfile.ZipFile(out).namelist()
    assert out.stat().st_size < 40 * 2**20, f"upload is {out.stat().st_size / 2**20:.1f} MiB"  # 21 MB are toy weights
    assert "ray_jobs/deploy/submit.py" in names and "diclip/cli.py" in names
    # "/data" is anchored: the diclip.data package must survive the exclude
    assert any(n.startswith("diclip/data/") for n in names)
    for banned in (".git/", ".venv/", "runs/", "data/"):
        assert not any(n.startswith(banned) for n in names), banned
    assert not any("__pycache__" in n for n in names)
    # the shipped toy weights travel (diclip:toy/... in configs/demo.yaml must load on the cluster); other
    # weights stay home, and without the toy folder the package stays as small as before
    assert sorted(n for n in names if n.endswith(".safetensors")) == TOY_WEIGHTS
    toy = sum(i.compress_size for i in zipfile.ZipFile(out).infolist() if i.filename.startswith(TOY_DIR))
    assert out.stat().st_size - toy < 5 * 2**20, f"upload without the toy models is {(out.stat().st_size - toy) / 2**20:.1f} MiB"
    stray = REPO / "runs" / "weights.safetensors"  # a user's own weights in the repository stay out
    assert not submit._uploaded(stray, REPO) and submit._uploaded(REPO / TOY_WEIGHTS[0], REPO)


TOY_DIR = "diclip/resources/toy/"
TOY_WEIGHTS = sorted(str(p.relative_to(REPO)) for p in (REPO / TOY_DIR).rglob("*.safetensors"))


def test_launcher_rsync_and_docker_context_keep_the_toy_weights(tmp_path: Path) -> None:
    """The launcher's rsync rules, run by the real rsync with the arguments Ray builds from them, and the
    Dockerfile's ignore file: the toy weights reach every node and the image, other weights do not."""
    assert len(TOY_WEIGHTS) == 4
    src = tmp_path / "repo"  # a copy of the layout that matters, plus weights of the user's own
    for rel in [*TOY_WEIGHTS, "diclip/cli.py", "weights/sd.safetensors", "runs/x/model.safetensors", ".venv/x.py"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x")
    launcher = yaml.safe_load((REPO / "cluster" / "aws" / "cluster-launcher.yaml").read_text())
    rsync = shutil.which("rsync")
    if rsync:
        from ray.autoscaler._private.command_runner import SSHCommandRunner

        args = SSHCommandRunner._create_rsync_filter_args(None, launcher)  # self is unused
        r = subprocess.run([rsync, "-a", *args, f"{src}/", str(tmp_path / "node")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        synced = sorted(str(p.relative_to(tmp_path / "node")) for p in (tmp_path / "node").rglob("*") if p.is_file())
        assert synced == sorted([*TOY_WEIGHTS, "diclip/cli.py"])
    # .dockerignore: '!' re-includes, the last matching line wins (the gitwildmatch meaning of these lines)
    from ray._private.thirdparty.pathspec import PathSpec

    rules = [line for line in (REPO / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    ignored = PathSpec.from_lines("gitwildmatch", rules)
    assert not any(ignored.match_file(p) for p in TOY_WEIGHTS)
    assert ignored.match_file("weights/sd.safetensors") and ignored.match_file("diclip/other/w.safetensors")


def test_spec_inside_the_repo_is_referenced_with_overrides() -> None:
    overrides = ["name=x", "pipeline.stages=[synthesize]"]
    spec = load_spec(str(CONFIGS / "demo.yaml"), overrides)
    staged = submit.stage_spec(str(CONFIGS / "demo.yaml"), overrides, spec, "diclip-x-test")
    assert staged.path == "configs/demo.yaml" and staged.temp_file is None
    assert staged.overrides == [*overrides, "ray.address=auto"]
    root = submit.repo_root()
    assert submit._uploaded(root / "diclip" / "data" / "x.yaml", root)
    assert not submit._uploaded(root / "runs" / "x.yaml", root)
    assert not submit._uploaded(root / "data" / "x.yaml", root)
    assert not submit._uploaded(Path(tempfile.gettempdir()) / "x.yaml", root)


def test_spec_outside_the_repo_uploads_its_merged_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    src = tmp_path / "myspec.yaml"
    shutil.copy(CONFIGS / "demo.yaml", src)
    overrides = ["name=outside", f"output_uri={tmp_path}/runs", "train.max_iters=3"]
    spec = load_spec(str(src), overrides)
    sub_id = f"diclip-outside-test-{uuid.uuid4().hex[:8]}"
    staged = submit.stage_spec(str(src), overrides, spec, sub_id)
    try:
        assert staged.temp_file is not None and staged.temp_file.is_file()
        assert staged.path == f"{submit.SUBMIT_DIR}/{sub_id}.yaml"
        assert staged.overrides == ["ray.address=auto"]  # the user's overrides are merged in already
        assert submit._uploaded(staged.temp_file, submit.repo_root())
        text = staged.temp_file.read_text()
        assert SECRET_VALUE not in text
        assert load_spec(str(staged.temp_file)) == spec
    finally:
        staged.cleanup()
    assert not staged.temp_file.exists()


def test_entrypoint_quotes_every_argument() -> None:
    args = ["name=a b", "pipeline.stages=[synthesize,train]", "output_uri=$HOME/x", "data.root='q'"]
    cmd = submit.entrypoint("configs/my spec.yaml", args)
    assert shlex.split(cmd) == ["python", "-m", "ray_jobs.deploy.launch", "run", "configs/my spec.yaml", *args]
    assert "$HOME" in cmd and "'output_uri=$HOME/x'" in cmd  # no expansion by the cluster's shell
    explicit = submit.entrypoint("c.yaml", [], python="/opt/my venv/bin/python")  # cluster.python
    assert shlex.split(explicit)[:3] == ["/opt/my venv/bin/python", "-m", "ray_jobs.deploy.launch"]


def test_submission_ids_are_readable_and_unique() -> None:
    spec = load_spec(str(CONFIGS / "demo.yaml"))
    a, b = submit.submission_id(spec), submit.submission_id(spec)
    assert a != b and re.fullmatch(r"diclip-demo-\d{8}-\d{6}-[0-9a-f]{4}", a)


@pytest.mark.parametrize("argv", [["submit", str(CONFIGS / "demo.yaml"), "output_uri=s3://b/x"], ["status", "j"],
                                  ["logs", "j"],
                                  ["stop", "j"]])
def test_missing_address_is_one_line(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: no Ray address: pass --address http://HOST:8265 or set RAY_ADDRESS"


@pytest.mark.parametrize("argv", [["submit", str(CONFIGS / "demo.yaml"), "output_uri=s3://b/x",
                                   "--address", "http://127.0.0.1:1"],
                                  ["status", "j", "--address", "http://127.0.0.1:1"],
                                  ["logs", "j", "--follow", "--address", "127.0.0.1:1"],
                                  ["stop", "j"]])
@pytest.mark.timeout(120)  # a hang guard: the claim is "an error, not a hang", not a speed
def test_unreachable_address_fails_fast(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # used by the last case
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot reach Ray dashboard at http://127.0.0.1:1: ")
    assert not (REPO / submit.SUBMIT_DIR).exists() or not any((REPO / submit.SUBMIT_DIR).glob("diclip-demo-*"))


def test_token_errors_say_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import AuthenticationError

    messages = iter(["Authentication required: Unauthorized: Missing authentication token",
                     "Authentication failed: Forbidden: Invalid authentication token"])

    class Rejecting:
        def __init__(self, address: str) -> None:
            raise AuthenticationError(next(messages))

    monkeypatch.setattr(submit, "_check_reachable", lambda address: None)
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", Rejecting)
    with pytest.raises(DiclipError) as e:
        submit.connect("http://ray-head:8265")
    assert str(e.value) == submit.TOKEN_HINT
    assert str(e.value).startswith("the cluster requires a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
    with pytest.raises(DiclipError, match="rejected the token"):
        submit.connect("http://ray-head:8265")


def test_http_401_from_a_proxy_is_a_token_error() -> None:
    with pytest.raises(DiclipError, match="requires a token"):
        with submit._api_errors("http://x:8265"):
            raise RuntimeError("Request failed with status code 401: Unauthorized.")
    with pytest.raises(DiclipError, match="no job 'j1'"):
        with submit._api_errors("http://x:8265", "j1"):
            raise RuntimeError("Request failed with status code 404: Job j1 does not exist.")


# ----------------------------------------------------------------------------------------------
# a real submission to a local Ray cluster
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_cluster(auth_env: dict[str, str], gcs_port: int | None = None, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """A real single-node Ray cluster with a dashboard; yields its Jobs API address.

    Only this cluster is torn down: `ray stop` would kill every Ray instance of this user (other test
    sessions run Ray too), so `ray start --block` runs in its own session and teardown signals exactly
    that session's processes.
    """
    venv_bin = Path(sys.executable).parent
    ray_bin = venv_bin / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    temp_dir = tempfile.mkdtemp(prefix="dcl", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    # `python` in the job's entrypoint must be this virtualenv's interpreter
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", **auth_env)
    log_path = Path(temp_dir) / "ray-start.log"
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={gcs_port or free_port()}", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--temp-dir={temp_dir}", *extra]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:  # the jobs endpoint, not just the dashboard: JobHead starts a bit later
                with urllib.request.urlopen(f"{address}/api/jobs/", timeout=2):
                    break
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # token mode: up, and refusing us
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray start tears its processes down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 15
        while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def local_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Cluster and this (client) process both with RAY_AUTH_MODE=disabled.

    Ray 2.60 accepts `ray start` with RAY_AUTH_MODE=disabled. Token mode is exercised separately with
    client subprocesses: the client reads RAY_AUTH_MODE when ray is first imported, which in a pytest
    process has long happened.
    """
    with ray_cluster({"RAY_AUTH_MODE": "disabled"}) as address:
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        yield address


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_real_submission_runs_on_a_local_cluster(local_ray_cluster: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    address = local_ray_cluster
    name = f"sub-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    rc = cli.main(["submit", str(CONFIGS / "demo.yaml"), f"name={name}", f"output_uri={tmp_path}/runs",
                   "pipeline.stages=[synthesize]", "cluster.shared_filesystem=true",  # one node: this machine
                   "--address", address, "--timeout", "300"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0, "\n".join(out[-45:])
    assert out[0].startswith(f"submitted diclip-{name}-")
    job_id = out[0].split()[1]
    assert out[-1].startswith(f"{job_id}: SUCCEEDED")
    assert (tmp_path / "runs" / "data" / "synthetic.json").is_file()  # written by the job on the cluster
    submit_s = time.monotonic() - t0

    assert cli.main(["status", job_id, "--address", address]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert cli.main(["logs", job_id, "--address", address]) == 0
    logs = capsys.readouterr().out
    assert "stage synthesize" in logs and "ray.address=auto" in logs
    with pytest.MonkeyPatch.context() as mp:  # the address only exported, as the README suggests
        mp.setenv("RAY_ADDRESS", address)
        assert cli.main(["logs", job_id, "--follow"]) == 0
        followed = capsys.readouterr().out
    assert "stage synthesize" in followed
    assert cli.main(["stop", job_id, "--address", address]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id} was not running (SUCCEEDED)"
    assert cli.main(["status", "no-such-job", "--address", address]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: no job 'no-such-job' at {address}"

    # a spec outside the repo goes up as its merged YAML; --no-wait returns at once
    src = tmp_path / "elsewhere.yaml"
    shutil.copy(CONFIGS / "demo.yaml", src)
    rc = cli.main(["submit", str(src), f"name={name}-2", f"output_uri={tmp_path}/runs2",
                   "pipeline.stages=[synthesize]", "cluster.shared_filesystem=true", "--address", address, "--no-wait"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0].startswith(f"submitted diclip-{name}-2-")
    job2 = out[0].split()[1]
    assert not (REPO / submit.SUBMIT_DIR / f"{job2}.yaml").exists()  # removed once uploaded
    client = submit.connect(address)
    assert submit.wait(client, job2, address, timeout_s=300) == "SUCCEEDED"
    assert (tmp_path / "runs2" / "data" / "synthetic.json").is_file()
    assert f"{submit.SUBMIT_DIR}/{job2}.yaml" in client.get_job_logs(job2)

    # a cluster.python without diclip's dependencies: the job fails with one line naming the fix
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    rc = cli.main(["submit", str(CONFIGS / "demo.yaml"), f"name={name}-3", f"output_uri={tmp_path}/runs3",
                   "pipeline.stages=[synthesize]", "cluster.shared_filesystem=true", f"cluster.python={bare}/bin/python",
                   "--address", address, "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 1 and "Traceback" not in out, out
    assert f"error: {bare}/bin/python on the cluster has no module " in out
    job3 = next(ln.split()[1] for ln in out.splitlines() if ln.startswith("submitted "))
    assert cli.main(["status", job3, "--address", address]) == 1  # the exit code follows the job's state
    assert capsys.readouterr().out.startswith("FAILED: ")
    print(f"first submission took {submit_s:.1f}s, whole test {time.monotonic() - t0:.1f}s", file=sys.stderr)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_token_auth_cluster_needs_the_token() -> None:
    """Pitfall 15 for real: `ray start` with RAY_AUTH_MODE=token + RAY_AUTH_TOKEN; clients without the
    token get the one-line hint, with a wrong token a rejection, with the token through to the API."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    with ray_cluster({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as address:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}

        def status(**auth: str) -> tuple[int, str]:
            r = subprocess.run([sys.executable, "-m", "diclip.cli", "status", "no-such-job", "--address", address],
                               env={**base, **auth}, capture_output=True, text=True, timeout=120, cwd=REPO)
            return r.returncode, (r.stderr.strip().splitlines() or [""])[-1]

        # explicit "disabled": with RAY_AUTH_MODE unset, Ray may pick up a token from ~/.ray/auth_token
        assert status(RAY_AUTH_MODE="disabled") == (2, f"error: {submit.TOKEN_HINT}")
        rc, err = status(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="f" * 64)
        assert rc == 2 and "rejected the token" in err, err
        assert status(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) == (2, f"error: no job 'no-such-job' at {address}")


OWN_INSTANCE_SCRIPT = r"""
import json, sys
import diclip, ray
from diclip.config import load_spec
from ray_jobs.runtime.ray_session import init_ray

init_ray(load_spec("configs/demo.yaml", ["ray.num_cpus=1"]))

@ray.remote(num_cpus=0)
def state_api_from_a_worker():
    # what Ray Train's placement-group cleaner does from inside the cluster
    from ray.util.state import list_nodes
    return [n.node_id for n in list_nodes()]

print(json.dumps({"seen": ray.get(state_api_from_a_worker.remote()),
                  "own": ray.get_runtime_context().get_node_id()}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_ray_instance_on_the_host_does_not_confuse_the_pipeline(local_ray_cluster: str,
                                                                         tmp_path: Path) -> None:
    """With another Ray instance running, the State API inside our workers auto-detected "the" local Ray
    and failed ("Found multiple active Ray instances", Ray Train's cleaner printed it every few seconds).
    The pipeline's instance is now addressed explicitly, so workers reach their own cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    out = subprocess.run([sys.executable, "-c", OWN_INSTANCE_SCRIPT], cwd=str(REPO), env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "multiple active Ray instances" not in out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["seen"] == [result["own"]]  # our node, not the other instance's


def _view(nodes, node_types=None, autoscaling=False):
    from ray_jobs.deploy.cluster_fit import ClusterView

    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    return ClusterView(nodes=nodes, total=total, node_types=node_types, autoscaling=autoscaling)


def test_a_joined_cluster_is_checked_against_what_it_can_ever_offer() -> None:
    """Nodes now, the autoscaler's node types when published, or (unknown types) a note that the run waits."""
    from ray_jobs.deploy.cluster_fit import check_cluster

    voc = load_spec(str(CONFIGS / "voc.yaml"), shared("voc"))
    cpu_only = [{"CPU": 16.0, "GPU": 0.0}]
    with pytest.raises(ConfigError, match=r"^correlate: each actor asks for \{CPU: 4, GPU: 1\} but the cluster has no "
                                          r"GPU and no autoscaler to add one, so it would wait forever; set "
                                          r"correlate.resources.num_gpus=0 \(CPU\)"):
        check_cluster(voc, ["correlate"], _view(cpu_only))
    with pytest.raises(ConfigError, match=r"^train: each worker asks for \{CPU: 8, GPU: 1\} .* train.use_gpu=false"):
        check_cluster(voc, ["train"], _view(cpu_only))
    # an autoscaling cluster that starts without GPUs: its node types decide
    gpu_type = {"CPU": 8.0, "GPU": 1.0}
    notes = check_cluster(voc, ["correlate", "train"], _view(cpu_only, [cpu_only[0], gpu_type], autoscaling=True))
    assert len(notes) == 2 and "waiting (up to ray.stall_minutes=30) for the autoscaler" in notes[0]
    with pytest.raises(ConfigError, match=r"none of its autoscaler's node types \(\{CPU: 16, GPU: 0\}\) has it"):
        check_cluster(voc, ["correlate"], _view(cpu_only, [cpu_only[0]], autoscaling=True))
    # node types not published, but an autoscaler runs: one note, and the run waits for it
    notes = check_cluster(voc, ["correlate"], _view(cpu_only, autoscaling=True))
    assert notes == ["correlate: each actor asks for {CPU: 4, GPU: 1} and the cluster has no GPU now; waiting (up "
                     "to ray.stall_minutes=30) for the cluster's autoscaler to add such a node"]
    # a fixed cluster that has the GPUs: the whole fixed-size pool must fit too
    gpu_box = [{"CPU": 64.0, "GPU": 8.0}]
    assert check_cluster(voc, list(voc.pipeline.stages), _view(gpu_box)) == []
    with pytest.raises(ConfigError, match=r"^correlate: its pool of 8 actors x 1 GPU = 8 GPUs but the cluster has 4"):
        check_cluster(voc, ["correlate"], _view([{"CPU": 64.0, "GPU": 4.0}]))
    with pytest.raises(ConfigError, match=r"^correlate: each actor asks for \{CPU: 4, GPU: 1\} but its largest node has "
                                          r"\{CPU: 2, GPU: 1\}"):
        check_cluster(voc, ["correlate"], _view([{"CPU": 2.0, "GPU": 1.0}]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_gpu_stage_on_a_joined_cluster_without_gpus_is_refused_at_once(tmp_path: Path) -> None:
    """A real `ray start --head --num-gpus=0` cluster (no autoscaler): a GPU stage joining it (ray.address) is
    refused in one line right after joining, instead of waiting ray.stall_minutes for the watchdog."""
    gcs = free_port()
    with ray_cluster({"RAY_AUTH_MODE": "disabled"}, gcs_port=gcs, extra=("--num-gpus=0",)):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        env["RAY_AUTH_MODE"] = "disabled"
        r = subprocess.run([sys.executable, "-m", "diclip.cli", "correlate", str(CONFIGS / "tiny.yaml"),
                            f"output_uri={tmp_path}/run", f"ray.address=127.0.0.1:{gcs}",
                            "correlate.resources.num_gpus=1"], cwd=str(REPO), env=env, capture_output=True,
                           text=True, timeout=240)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert err[-1] == ("error: correlate: each actor asks for {CPU: 0.5, GPU: 1} but the cluster has no GPU and no "
                       "autoscaler to add one, so it would wait forever; set correlate.resources.num_gpus=0 (CPU), or "
                       "join a cluster with GPU nodes")
    assert not any("Traceback" in line for line in err)


# ----------------------------------------------------------------------------------------------
# the READMEs say what the code does
# ----------------------------------------------------------------------------------------------
def test_readmes_apply_the_configmap_before_the_rayjob_and_document_every_cluster_setting() -> None:
    import dataclasses

    from diclip.config import ClusterConfig

    for readme in (REPO / "README.md", REPO / "cluster" / "README.md"):
        text = readme.read_text()
        applies = re.findall(r"kubectl apply -f \S+/(spec-configmap|rayjob)\.yaml", text)
        assert applies and applies.index("spec-configmap") < applies.index("rayjob"), readme
    documented = set(re.findall(r"`cluster\.([a-z_0-9]+)`", (REPO / "cluster" / "README.md").read_text()))
    assert {f.name for f in dataclasses.fields(ClusterConfig)} <= documented


def _merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch, what `kubectl run --overrides` applies by default: lists are replaced."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def test_the_pvc_fill_pod_of_the_cluster_readme_runs_a_shell_with_the_claim_mounted() -> None:
    """`kubectl run hf-fill ... --overrides=JSON`: kubectl merges JSON over the pod it generates, and a
    merge patch replaces the containers list, so the shell must be the override's own command (a `-- bash`
    would be lost). Checked here by applying the README's JSON to the pod kubectl generates for `run -it
    --image I hf-fill`, then validating the pod spec against the Kubernetes PodSpec schema vendored in the
    KubeRay CRD; kubectl itself is not run (no cluster here)."""
    text = (REPO / "cluster" / "README.md").read_text()
    m = re.search(r"kubectl run hf-fill (.*?)--overrides='(.*?)'([^\n]*)", text, re.S)
    assert m, "cluster/README.md has no kubectl run hf-fill ... --overrides='...'"
    assert "-n <namespace>" in m.group(1) and not m.group(3).strip(), m.group(3)  # nothing after the JSON
    generated = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hf-fill"},
                 "spec": {"containers": [{"name": "hf-fill", "image": "python:3.11-slim", "stdin": True,
                                          "stdinOnce": True, "tty": True}]}}
    pod = _merge_patch(generated, json.loads(m.group(2)))
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["bash"] and c["stdin"] and c["tty"]
    (mount,) = c["volumeMounts"]
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/models/hf" and vol["persistentVolumeClaim"]["claimName"] == "hf-models"
    _, schema = crd("RayCluster")
    pod_spec = schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    jsonschema.Draft7Validator(pod_spec["properties"]["spec"]).validate(pod["spec"])
    # the fill commands that follow use the same HF_HOME, and only ids that exist on the Hub today
    after = text[m.end():].split("```", 1)[0]
    assert "export HF_HOME=/models/hf" in after
    assert "stabilityai/" not in after and "runwayml/" not in after
    for line in re.findall(r"^kubectl get rayjob .*$", text, re.M):
        assert " -n " in line, line


# ----------------------------------------------------------------------------------------------
# the optional CPU-only worker group (evaluate's dense-CRF tasks)
# ----------------------------------------------------------------------------------------------
def test_cpu_workers_render_as_a_second_group_in_both_manifests(tmp_path: Path) -> None:
    files = render(tmp_path, "coco", "cluster.cpu_workers.count=6", "cluster.cpu_workers.cpus=48")
    cluster, job = load(files["raycluster.yaml"]), load(files["rayjob.yaml"])
    validate_k8s(cluster)
    validate_k8s(job)
    gpu, cpu = cluster["spec"]["workerGroupSpecs"]
    assert gpu["groupName"] == "gpu-workers" and cpu["groupName"] == cluster_render.CPU_GROUP
    assert (cpu["minReplicas"], cpu["replicas"], cpu["maxReplicas"]) == (0, 0, 6)  # autoscaled like the GPU group
    pod = cpu["template"]["spec"]
    (c,) = pod["containers"]
    # c7i.12xlarge has 48 vCPU / 96 GiB: the pod asks for 90% of it (the kubelet keeps the rest), the AWS node
    # declares all 48
    assert c["resources"]["limits"] == c["resources"]["requests"] == {"cpu": "43", "memory": "86Gi"}
    assert "tolerations" not in pod and {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]
    assert c["envFrom"] == gpu["template"]["spec"]["containers"][0]["envFrom"]  # the same S3 Secret
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"] == cluster["spec"]["workerGroupSpecs"]
    launcher = load(files["cluster-launcher.yaml"])
    jsonschema.validate(launcher, ray_schema())
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))
    node = launcher["available_node_types"]["cpu_only_workers"]
    assert node["node_config"]["InstanceType"] == "c7i.12xlarge" and node["resources"] == {"CPU": 48}
    assert (node["min_workers"], node["max_workers"]) == (0, 6)
    assert launcher["max_workers"] == launcher["available_node_types"]["gpu_worker"]["max_workers"] + 6
    # a named instance type; the default (count 0) renders no CPU group at all
    named = load(render(tmp_path / "named", "coco", "cluster.cpu_workers.count=2", "cluster.cpu_workers.cpus=90",
                        "cluster.cpu_workers.instance=c6a.24xlarge")["cluster-launcher.yaml"])
    assert named["available_node_types"]["cpu_only_workers"]["node_config"]["InstanceType"] == "c6a.24xlarge"
    assert named["available_node_types"]["cpu_only_workers"]["resources"] == {"CPU": 90}
    named_pod = load(render(tmp_path / "named-k8s", "coco", "cluster.cpu_workers.count=2", "cluster.cpu_workers.cpus=90",
                            "cluster.cpu_workers.instance=c6a.24xlarge")["raycluster.yaml"])
    (c,) = named_pod["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"]
    assert c["resources"]["requests"] == {"cpu": "90", "memory": "180Gi"}  # an unlisted type: taken as given
    plain = render(tmp_path / "plain", "coco")
    assert len(load(plain["raycluster.yaml"])["spec"]["workerGroupSpecs"]) == 1
    assert "cpu_only_workers" not in load(plain["cluster-launcher.yaml"])["available_node_types"]


def test_the_readme_coco_cpu_workers_fit_their_node(tmp_path: Path) -> None:
    """README "COCO on 8 GPUs": cpus=192 on a c7i.48xlarge (192 vCPU, 384 GiB) must not ask KubeRay for the
    whole node (a pod requesting cpu "192" / 384Gi never schedules); the launcher's node declares all 192."""
    files = render(tmp_path, "coco", "cluster.cpu_workers.count=3", "cluster.cpu_workers.cpus=192")
    (c,) = load(files["raycluster.yaml"])["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"]
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"cpu": "172", "memory": "344Gi"}
    assert 172 <= 0.9 * 192 and 344 <= 0.9 * 384
    node = load(files["cluster-launcher.yaml"])["available_node_types"]["cpu_only_workers"]
    assert node["node_config"]["InstanceType"] == "c7i.48xlarge" and node["resources"] == {"CPU": 192}
    explicit = render(tmp_path / "explicit", "coco", "cluster.cpu_workers.count=1", "cluster.cpu_workers.cpus=16",
                      "cluster.cpu_workers.memory_gib=20")
    (c,) = load(explicit["raycluster.yaml"])["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"]
    assert c["resources"]["requests"] == {"cpu": "14", "memory": "20Gi"}  # c7i.4xlarge: 16 vCPU, 32 GiB


@pytest.mark.parametrize("overrides, line", [
    (["cluster.cpu_workers.count=3", "cluster.cpu_workers.cpus=192", "cluster.cpu_workers.memory_gib=384"],
     "cluster.cpu_workers.memory_gib=384: a pod on c7i.48xlarge (384 GiB) can get at most 345 GiB (the rest is the "
     "node's own); lower it, or 0 for the default"),
    (["cluster.cpu_workers.count=2", "cluster.cpu_workers.instance=c7i.4xlarge"],
     "cluster.cpu_workers.instance=c7i.4xlarge has 16 vCPUs, fewer than cluster.cpu_workers.cpus=32; name a larger "
     "type or lower cpus"),
    (["cluster.cpu_workers.count=2", "cluster.cpu_workers.cpus=500"],
     "cluster.cpu_workers.cpus=500: no listed AWS instance type has that many vCPUs (the largest, c7i.48xlarge, has "
     "192); lower it or name one in cluster.cpu_workers.instance"),
])
def test_impossible_cpu_worker_plans_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  overrides: list[str], line: str) -> None:
    out = tmp_path / "out"
    rc = cli.main(["cluster", "render", str(CONFIGS / "coco.yaml"), *S3_ROOTS, *overrides, "--out", str(out)])
    assert rc == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {line}"]
    assert not out.exists()


@pytest.mark.parametrize("override, needle", [
    ("cluster.cpu_workers.count=-1", "cluster.cpu_workers.count must be >= 0"),
    ("cluster.cpu_workers.cpus=0", "cluster.cpu_workers.cpus must be >= 1"),
    ("cluster.cpu_workers.instance=C7I", "cluster.cpu_workers.instance 'C7I' must be an AWS instance type"),
    ("evaluate.crf_placement=gpu", "evaluate.crf_placement must be tasks|actor, got 'gpu'"),
    ("evaluate.crf_cpus=0", "evaluate.crf_cpus must be > 0"),
])
def test_bad_cpu_worker_and_crf_settings_are_one_line(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        load_spec(str(CONFIGS / "coco.yaml"), [override])
    assert "\n" not in str(e.value)


def test_crf_tasks_that_no_node_can_host_are_refused() -> None:
    """Locally (validate) and on a joined cluster: a CRF task larger than what the actors leave, or than any node."""
    from ray_jobs.deploy.cluster_fit import check_cluster
    from ray_jobs.validate import check_resources

    coco = load_spec(str(CONFIGS / "coco.yaml"), shared("coco", "pipeline.stages=[evaluate]", "evaluate.crf_cpus=8"))
    with pytest.raises(ConfigError, match=r"^evaluate: its pool of 16 actors x 4 CPUs = 64 CPUs leaves 4 of the 68 "
                                          r"CPUs, less than one CRF task needs \(8\), so no segmentation would ever "
                                          r"finish; lower evaluate.crf_cpus"):
        check_resources(coco, 68, 16)
    check_resources(coco, 72, 16)
    with pytest.raises(ConfigError, match=r"^evaluate: each CRF task asks for \{CPU: 8\} but the cluster's largest node "
                                          r"has \{CPU: 4, GPU: 1\}; lower evaluate.crf_cpus, or set "
                                          r"evaluate.crf_placement=actor$"):
        check_cluster(coco, ["evaluate"], _view([{"CPU": 4.0, "GPU": 1.0}] * 16))
    # an autoscaler whose CPU-only node type has the CPUs: fine
    check_cluster(coco, ["evaluate"], _view([{"CPU": 4.0, "GPU": 1.0}] * 16, [{"CPU": 4.0, "GPU": 1.0},
                                                                              {"CPU": 48.0}], autoscaling=True))


@pytest.mark.parametrize("config", ["voc", "coco"])
def test_evaluate_only_workers_get_spare_cpus_for_crf_tasks(tmp_path: Path, config: str) -> None:
    """pipeline.stages=[evaluate] with the CRF in tasks and no CPU-only group: each GPU worker gets the actor's 4
    CPUs plus crf_spare_cpus (4) for CRF tasks (g5.2xlarge), not only the actor's (every CRF on the head)."""
    files = render(tmp_path, config, "pipeline.stages=[evaluate]")
    (gpu,) = load(files["raycluster.yaml"])["spec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "8"
    launcher = load(files["cluster-launcher.yaml"])
    assert launcher["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] == "g5.2xlarge"
    assert gpu["maxReplicas"] == load_spec(str(CONFIGS / f"{config}.yaml")).evaluate.resources.concurrency
    spec = load_spec(str(CONFIGS / f"{config}.yaml"), shared(config, "pipeline.stages=[evaluate]"))
    plan = cluster_render.plan_cluster(spec)
    assert cluster_render.crf_cpus_left(plan.cpus_per_worker, plan.gpus_per_worker, spec.evaluate.resources) \
        == cluster_render.crf_spare_cpus(spec) == 4
    # a larger CRF task gets its CPUs; in-actor CRF or a CPU-only group: no spare
    big = load_spec(str(CONFIGS / f"{config}.yaml"), shared(config, "pipeline.stages=[evaluate]", "evaluate.crf_cpus=6"))
    assert cluster_render.plan_cluster(big).cpus_per_worker == 10
    # a CRF task larger than the CPU-only group's pods: one line; a bigger group fits it
    with pytest.raises(ConfigError, match=r"^evaluate.crf_cpus=40: each CRF task needs more CPUs than any worker "
                                          r"has \(the largest has \d+\); lower evaluate.crf_cpus or raise "
                                          r"cluster.cpu_workers.cpus \(with cluster.cpu_workers.count > 0\)$"):
        render(tmp_path / "big", config, "evaluate.crf_cpus=40", "cluster.cpu_workers.count=1",
               "cluster.cpu_workers.cpus=32")
    render(tmp_path / "bigger", config, "evaluate.crf_cpus=40", "cluster.cpu_workers.count=1",
           "cluster.cpu_workers.cpus=64")
    for extra in ("evaluate.crf_placement=actor", "cluster.cpu_workers.count=2"):
        other = load_spec(str(CONFIGS / f"{config}.yaml"), shared(config, "pipeline.stages=[evaluate]", extra))
        assert cluster_render.crf_spare_cpus(other) == 0 and cluster_render.plan_cluster(other).cpus_per_worker == 4


def test_a_joined_cluster_whose_workers_leave_no_cpu_for_crf_is_one_line() -> None:
    """Workers sized to the actor (4 CPUs + 1 GPU, actor 4 CPUs): every CRF would run on the head."""
    from ray_jobs.deploy.cluster_fit import check_cluster

    voc = load_spec(str(CONFIGS / "voc.yaml"), shared("voc", "pipeline.stages=[evaluate]"))
    head, worker = {"CPU": 4.0, "GPU": 0.0}, {"CPU": 4.0, "GPU": 1.0}
    view = _view([head] + [worker] * 8)
    view.heads = [True] + [False] * 8
    line = ("evaluate: each CRF task needs evaluate.crf_cpus=1 CPUs but every worker node's CPUs minus the evaluate "
            "actors' leave 0, so every CRF would run on the head; set cluster.cpu_workers.count>0 (CPU-only "
            "workers) or evaluate.crf_placement=actor")
    with pytest.raises(ConfigError) as e:
        check_cluster(voc, ["evaluate"], view)
    assert str(e.value) == line
    # autoscaler node types: the same refusal; a CPU-only node type, bigger GPU workers or in-actor CRF: fine
    typed = _view([head], [worker], autoscaling=True)
    typed.heads = [True]
    with pytest.raises(ConfigError, match="every CRF would run on the head"):
        check_cluster(voc, ["evaluate"], typed)
    typed.node_types = [worker, {"CPU": 48.0}]
    check_cluster(voc, ["evaluate"], typed)
    big = _view([head] + [{"CPU": 8.0, "GPU": 1.0}] * 8)
    big.heads = [True] + [False] * 8
    check_cluster(voc, ["evaluate"], big)
    actor = load_spec(str(CONFIGS / "voc.yaml"), shared("voc", "pipeline.stages=[evaluate]",
                                                      "evaluate.crf_placement=actor"))
    check_cluster(actor, ["evaluate"], view)
