"""Stage ``synthesize``: the synthetic demo dataset (coloured shapes with exact masks), VOC layout."""
from __future__ import annotations

from diclip.config import JobSpec
from diclip.data.synthetic import generate_synthetic
from diclip.logging import get_logger

log = get_logger("ray_jobs.synthesize")


def output_uri(spec: JobSpec) -> str:
    return spec.data.root


def is_complete(spec: JobSpec) -> bool:
    from diclip import storage

    return storage.exists(storage.join(spec.data.root, "synthetic.json"))


def run(spec: JobSpec) -> dict:
    c = spec.synthesize
    class_set = spec.data.dataset if spec.data.dataset in ("synthetic", "toy") else "synthetic"
    if spec.data.classes_file:  # your class names on the synthetic shapes (one shape per class, at most 4)
        from diclip.data import class_set_for

        class_set = class_set_for(spec.data)
    elif class_set != spec.data.dataset:
        log.warning("data.dataset is %r; the synthesize stage writes the 'synthetic' class set", spec.data.dataset)
    summary = generate_synthetic(
        spec.data.root,
        num_train=c.num_train,
        num_val=c.num_val,
        image_size=tuple(c.image_size),
        seed=c.seed,
        max_objects=c.max_objects,
        class_set=class_set,
        show_progress=spec.ray.progress_bars,
    )
    log.info("synthetic data (%d train / %d val) %s %s", summary["num_train"], summary["num_val"],
             "already in" if summary["skipped"] else "written to", spec.data.root)
    return {"output": spec.data.root, "skipped": summary["skipped"], "class_counts": summary["class_counts"]}
