"""``diclip validate``: check a job spec before anything runs.

Structural checks (unknown keys, types, value ranges, unknown stage names) already happen when the
spec is loaded. Here: every URI is well formed, and every input a stage reads is either produced by
an earlier stage of this pipeline or already exists. Each problem is one line naming the field.
"""
from __future__ import annotations

from diclip import storage
from diclip.config import JobSpec
from diclip.errors import ConfigError, StorageError
from ray_jobs import registry
from ray_jobs.planning import stages_to_run, within


def _check_uri(field: str, uri: str) -> None:
    if not uri or not isinstance(uri, str):
        raise ConfigError(f"{field}: empty URI")
    try:
        storage.join(uri, "x")
    except StorageError as e:
        raise ConfigError(f"{field}: {e}") from e
    if uri.startswith("s3://") and len(uri) <= len("s3://"):
        raise ConfigError(f"{field}: s3 URI needs a bucket, got {uri!r}")


DATASET_LAYOUT = {
    "voc": "JPEGImages/, SegmentationClassAug/ (or SegmentationClass/), ImageSets/Segmentation/{train_aug,val}.txt "
           "and cls_labels.npy",
    "coco": "JPEGImages/{train,val}/, SegmentationClass/{train,val}/, ImageSets/Segmentation/ split lists "
            "and cls_labels.npy",
}
"""What ``data.root`` must hold per ``data.layout`` (README: Real data and weights)."""

INGEST_CPUS = 0.25
"""CPUs one Ray Data ingest task reserves while training (``RankDatasetFactory``'s ``map_batches``)."""


def local_resources(spec: JobSpec) -> tuple[float, float] | None:
    """(CPUs, GPUs) of the local Ray instance this spec would start; None when it joins a cluster."""
    import os

    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")) and not os.environ.get("RAY_JOB_ID"):
        address = ""  # a dashboard address: init_ray ignores it and starts a local Ray
    if spec.ray.address or os.environ.get("RAY_JOB_ID") or address:
        return None
    cpus = float(spec.ray.num_cpus or os.cpu_count() or 1)
    try:
        import torch

        gpus = float(torch.cuda.device_count())
    except Exception:
        gpus = 0.0
    return cpus, gpus


def check_resources(spec: JobSpec, cpus: float, gpus: float, where: str = "the local Ray") -> None:
    """Refuse, in one line, a plan that cannot make progress on a cluster of ``cpus`` CPUs and ``gpus`` GPUs.

    An actor pool is fixed-size (``concurrency`` actors): one larger than the cluster waits forever for its
    actors, and one that takes every CPU leaves none for the input tasks of the stages that have them
    (``Stage.prepares_inputs``). A train stage whose workers reserve every CPU starves Ray Data's ingest tasks
    the same way. Each waits silently (until ``ray.stall_minutes``). ``where``: whose CPUs and GPUs these are
    (a joined cluster without autoscaler is checked the same way, :mod:`ray_jobs.deploy.cluster_fit`)."""
    grow = "raise ray.num_cpus" if where == "the local Ray" else "add nodes to the cluster"
    for stage in spec.pipeline.stages:
        declared = registry.get(stage)
        if not declared.needs_ray:
            continue
        res = declared.settings(spec).resources
        if stage == "train":
            t = spec.train
            need_cpu = t.num_workers * res.num_cpus
            if need_cpu + INGEST_CPUS > cpus:
                raise ConfigError(
                    f"train: {t.num_workers} workers x {res.num_cpus:g} CPUs = {need_cpu:g} of the {cpus:g} CPUs leave "
                    f"Ray Data no CPU to load batches (it needs {INGEST_CPUS:g}), so training would wait forever; "
                    f"lower train.resources.num_cpus or train.num_workers, or {grow}")
            if t.use_gpu and t.num_workers * max(1.0, res.num_gpus) > gpus:
                raise ConfigError(f"train: {t.num_workers} workers need {t.num_workers * max(1.0, res.num_gpus):g} "
                                  f"GPUs but {where} has {gpus:g}; set train.use_gpu=false or run on a cluster "
                                  "with GPUs")
            continue
        pool = res.concurrency * res.num_cpus  # ActorPoolStrategy(size=concurrency): every actor must start
        if pool > cpus:
            raise ConfigError(f"{stage}: its pool of {res.concurrency} actors x {res.num_cpus:g} CPUs = {pool:g} CPUs "
                              f"does not fit in {where}'s {cpus:g} CPUs (the pool is fixed-size, so it would wait "
                              f"forever); lower {stage}.resources.concurrency or {stage}.resources.num_cpus, or "
                              f"{grow}")
        if declared.prepares_inputs and pool + res.prepare_cpus > cpus:
            raise ConfigError(f"{stage}: its pool of {res.concurrency} actors x {res.num_cpus:g} CPUs = {pool:g} CPUs "
                              f"leaves {cpus - pool:g} of the {cpus:g} CPUs, less than one input task needs "
                              f"({res.prepare_cpus:g}), so no input would ever reach the actors; lower "
                              f"{stage}.resources.concurrency, {stage}.resources.num_cpus or "
                              f"{stage}.resources.prepare_cpus, or {grow}")
        e = spec.evaluate
        if stage == "evaluate" and e.crf_in_tasks and pool + e.crf_cpus > cpus:
            raise ConfigError(f"evaluate: its pool of {res.concurrency} actors x {res.num_cpus:g} CPUs = {pool:g} CPUs "
                              f"leaves {cpus - pool:g} of the {cpus:g} CPUs, less than one CRF task needs "
                              f"({e.crf_cpus:g}), so no segmentation would ever finish; lower evaluate.crf_cpus, "
                              "evaluate.resources.concurrency or evaluate.resources.num_cpus, set "
                              f"evaluate.crf_placement=actor, or {grow}")
        if res.num_gpus > 0 and res.concurrency * res.num_gpus > gpus:
            raise ConfigError(f"{stage}: its pool of {res.concurrency} actors x {res.num_gpus:g} GPU = "
                              f"{res.concurrency * res.num_gpus:g} GPUs but {where} has {gpus:g}; set "
                              f"{stage}.resources.num_gpus=0 (CPU), lower {stage}.resources.concurrency or run on a "
                              f"cluster with GPUs")


CLUSTER_URI_ROOTS = ("output_uri", "data.root")
"""Checked first: every other artifact URI usually lives under one of them, and the message names the root."""


def cluster_uri_fields(spec: JobSpec) -> list[tuple[str, str]]:
    """Every artifact URI a cluster job reads or writes, as (dotted field, value): the fields named in
    :data:`diclip.config.URI_FIELDS` that are set, the two roots first. A stage's own settings count only
    when the stage is in the pipeline (``infer.input`` of a spec that never infers is not read). Model
    sources are not artifact URIs: a local model path is legitimate on a cluster (a mounted volume)."""
    import dataclasses

    from diclip.config import URI_FIELDS

    found: list[tuple[str, str]] = []

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.name in URI_FIELDS and isinstance(value, str) and value:
                found.append((f"{prefix}{f.name}", value))

    walk(spec, "")
    sections = {s.section: s.name for s in registry.STAGES}
    found = [(k, v) for k, v in found
             if k.split(".")[0] not in sections or sections[k.split(".")[0]] in spec.pipeline.stages]
    roots = [(k, v) for k, v in found if k in CLUSTER_URI_ROOTS]
    return sorted(roots, key=lambda kv: CLUSTER_URI_ROOTS.index(kv[0])) + [kv for kv in found if kv not in roots]


def check_cluster_uris(spec: JobSpec) -> None:
    """Refuse, in one line, artifact URIs that a cluster job would lose or split across nodes.

    A relative path resolves inside Ray's temporary copy of the working directory (deleted with the job);
    an absolute local path is each node's own disk unless ``cluster.shared_filesystem`` says otherwise.
    Every URI field is checked (data.classes_file, infer.input, stage outputs, train.resume_from, ...);
    those under ``output_uri``/``data.root`` pass or fail with their root, which is checked first."""
    for field, uri in cluster_uri_fields(spec):
        if uri.startswith("s3://"):
            continue
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if "://" not in uri and not path.startswith("/"):
            raise ConfigError(f"{field}={uri!r} is a relative path: on a cluster it lands in Ray's temporary copy "
                              f"of the working directory and is lost when the job ends; use {field}=s3://bucket/prefix")
        if "://" not in path and not spec.cluster.shared_filesystem:
            raise ConfigError(f"{field}={uri!r} is a local path, which on a cluster is each node's own disk; use "
                              f"{field}=s3://bucket/prefix (or cluster.shared_filesystem=true if every node mounts "
                              "it at that path)")


MASKS_CHECKED = 8
"""Masks of the training split read by ``validate`` against a classes file (a wrong list shows in the first few)."""


def check_class_file(spec: JobSpec) -> None:
    """``data.classes_file``: the file itself (fields, counts, duplicates), then, when the dataset is already
    there, its labels file (one entry per foreground class) and the first masks (no class id beyond the list)."""
    from diclip.data import class_set_for, open_split

    if not spec.data.classes_file:
        return
    class_set_for(spec.data)
    if "synthesize" in spec.pipeline.stages or not storage.exists(spec.data.root):
        return  # written by this pipeline with these classes
    ds = open_split(spec.data, spec.data.train_split)  # label width against the class count
    for image_id in ds.ids[:MASKS_CHECKED]:
        ds.read_mask(image_id)


def validate_spec(spec: JobSpec, check_exists: bool = True, local: bool = True) -> None:
    """``local``: the spec runs on this machine's Ray (not when submitting to a cluster)."""
    # the spec's own endpoint/region, not only AWS_ENDPOINT_URL: validate runs before any stage configures it
    storage.configure(storage.options_from(spec.storage))
    with storage.retry_budget(0):  # checking a spec does not wait out a store: a wrong endpoint is one line now
        _validate(spec, check_exists, local)


def _validate(spec: JobSpec, check_exists: bool, local: bool) -> None:
    _check_uri("output_uri", spec.output_uri)
    here = local_resources(spec) if local else None
    if here is not None:
        check_resources(spec, *here)
    if check_exists:  # an unreachable store or a missing bucket fails here, before Ray starts
        storage.check_writable_root(spec.output_uri)
        storage.exists(spec.output_uri)
        check_class_file(spec)
    produced: dict[str, str] = {}
    for name in spec.pipeline.stages:
        stage = registry.get(name)
        for field, uri in stage.input_uris(spec).items():
            _check_uri(field, uri)
            if any(within(uri, p) for p in produced.values()):
                continue
            if check_exists and not storage.exists(uri):
                _missing_input(spec, name, field, uri)
        out = stage.output_uri(spec)
        _check_uri(stage.output, out)
        produced[name] = out
    if check_exists:  # weights last: a missing model is one line here, not a traceback per Ray actor
        from diclip.models.sources import check_stage_models

        check_stage_models(spec, stages_to_run(spec))


def _missing_input(spec: JobSpec, stage: str, field: str, uri: str) -> None:
    """Refuse an input no earlier stage produces and nothing holds, naming the stage that would write it."""
    producer = next((s.name for s in registry.STAGES if within(uri, s.output_uri(spec))), None)
    if producer == "synthesize" and spec.data.dataset != "synthetic":
        # a real dataset is downloaded, never synthesised
        which = "your" if spec.data.classes_file else f"the {spec.data.dataset.upper()}"
        raise ConfigError(f"{field}: {uri} does not exist; download {which} "
                          f"dataset and set data.root to its folder (path or s3://bucket/prefix) "
                          f"holding {DATASET_LAYOUT[spec.data.layout]}")
    hint = f"; add stage {producer!r} before {stage!r} or run it first" if producer and producer != stage else ""
    raise ConfigError(f"{field}: {uri} does not exist and no earlier stage produces it{hint}")
