"""Stage ``synthesize``: the synthetic demo dataset (coloured shapes with exact masks), VOC layout."""
from __future__ import annotations

from diclip.config import JobSpec
from diclip.data.synthetic import existing_summary, generate_synthetic, recorded_params, synthetic_params
from diclip.logging import get_logger

log = get_logger("ray_jobs.stages.synthesize")


def output_uri(spec: JobSpec) -> str:
    return spec.data.root


def class_set(spec: JobSpec):
    """The class set drawn: ``data.dataset`` when synthetic or toy, a classes file's classes on the synthetic
    shapes (one shape per class, at most 4), else the synthetic set."""
    if spec.data.classes_file:
        from diclip.data import class_set_for

        return class_set_for(spec.data)
    return spec.data.dataset if spec.data.dataset in ("synthetic", "toy") else "synthetic"


def params(spec: JobSpec) -> dict:
    c = spec.synthesize
    return synthetic_params(c.num_train, c.num_val, tuple(c.image_size), c.seed, c.max_objects, class_set(spec))


def is_complete(spec: JobSpec) -> bool:
    """A finished dataset drawn with these params (seed, counts, size, objects, classes) is in data.root."""
    return existing_summary(spec.data.root, params(spec)) is not None


def stale(spec: JobSpec) -> list[str]:
    """Params that changed since the dataset in data.root was drawn (``validate`` lists them)."""
    from ray_jobs.runtime.lineage import changed_keys

    old = recorded_params(spec.data.root)
    if old is None:
        return []
    return [k if k in ("version", "class_set") else f"synthesize.{k}" for k in changed_keys(old, params(spec))]


def run(spec: JobSpec) -> dict:
    c = spec.synthesize
    drawn = class_set(spec)
    if not spec.data.classes_file and drawn != spec.data.dataset:
        log.warning("data.dataset is %r; the synthesize stage writes the 'synthetic' class set", spec.data.dataset)
    summary = generate_synthetic(
        spec.data.root,
        num_train=c.num_train,
        num_val=c.num_val,
        image_size=tuple(c.image_size),
        seed=c.seed,
        max_objects=c.max_objects,
        class_set=drawn,
        show_progress=spec.ray.show_progress(),
    )
    log.info("synthetic data (%d train / %d val) %s %s", summary["num_train"], summary["num_val"],
             "already in" if summary["skipped"] else "written to", spec.data.root)
    return {"output": spec.data.root, "skipped": summary["skipped"], "class_counts": summary["class_counts"]}
