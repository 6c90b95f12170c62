"""Ray drivers: one module per pipeline stage, plus the pipeline runner.

Each stage module exposes ``run(spec) -> dict`` (a short summary) and ``output_uri(spec) -> str``;
``STAGES`` maps stage names to modules (imported lazily, so ``diclip --help`` stays fast).
"""
from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "synthesize": "ray_jobs.synthesize",
    "generate": "ray_jobs.generate",
    "mask": "ray_jobs.mask",
    "cache": "ray_jobs.cache",
    "correlate": "ray_jobs.correlate",
    "train": "ray_jobs.train",
    "evaluate": "ray_jobs.evaluate",
    "infer": "ray_jobs.infer",
}

DESCRIPTIONS: dict[str, str] = {
    "synthesize": "write the synthetic demo dataset (VOC layout) into data.root",
    "generate": "text-to-image single-class images for the KV cache (Ray Data, diffusers)",
    "mask": "foreground masks for generated images with the training-free CAM path",
    "cache": "CLIP features inside masks -> per-class k-means -> KV cache (safetensors)",
    "correlate": "diffusion attention + ACR for every dataset image -> compact shards",
    "train": "adapter + segmenter with Ray Train + DeepSpeed",
    "evaluate": "CAM pseudo-label and segmentation mIoU, pictures",
    "infer": "masks for a folder/bucket of new images",
}


def stage_module(name: str) -> ModuleType:
    from diclip.errors import ConfigError

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    try:
        return importlib.import_module(STAGES[name])
    except ModuleNotFoundError as e:
        if e.name == STAGES[name]:
            raise ConfigError(f"stage {name!r} is not implemented yet in this version of diclip") from e
        raise
