"""The stage registry: every pipeline stage declared once, in pipeline order.

Planning (:mod:`ray_jobs.planning`), validation (:mod:`ray_jobs.validate`), the CLI's help and stage
subcommands (:mod:`diclip.cli`), the resource checks and the cluster renderer read :data:`STAGES` and keep no
table of stages of their own. Adding a stage is one :class:`Stage` here plus its module.

Contract of a stage module (``Stage.module``, imported only when the stage is planned or run, so
``diclip --help`` and spec validation stay fast): ``run(spec) -> dict`` (a short summary),
``is_complete(spec) -> bool`` (its manifest exists and was made with the spec's settings from its current
inputs) and ``stale(spec) -> list[str]`` (the settings or inputs that changed since its output was made).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional

from diclip.errors import ConfigError

if TYPE_CHECKING:  # the CLI's help reads the registry: no spec machinery (OmegaConf) for that
    from diclip.config import JobSpec


def field_value(spec: JobSpec, path: str) -> Any:
    """The value of a dotted spec field (``"train.output"`` -> ``spec.train.output``)."""
    obj: Any = spec
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _fields(*paths: str) -> Callable[["JobSpec"], tuple[str, ...]]:
    """``Stage.reads`` of a stage that always reads the same fields."""
    return lambda spec: paths


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: what it is, what it reads and writes, and where its code lives."""

    name: str
    """Subcommand and ``pipeline.stages`` entry."""
    description: str
    """One line for ``diclip --help`` and the stage's subcommand."""
    section: str
    """The spec section holding its settings (``spec.<section>``; ``<section>.resources`` for a Ray stage)."""
    output: str
    """Dotted spec field of the URI it writes (``data.root`` for ``synthesize``)."""
    reads: Callable[["JobSpec"], tuple[str, ...]]
    """Dotted spec fields of the artifact URIs it reads with this spec; the stages it reads are those of the
    pipeline whose output holds one of them (:func:`ray_jobs.planning.producers`), so an input pointed
    elsewhere reads no stage."""
    module: str
    """Its driver module (see the module docstring for the contract)."""
    pictures: Optional[str] = None
    """What it draws for people to look at, relative to its output."""
    needs_ray: bool = True
    """Runs on Ray (an actor pool or Ray Train, sized by ``<section>.resources``)."""
    prepares_inputs: bool = False
    """Ray Data CPU tasks read and decode its inputs ahead of the actor pool (they need CPUs the pool leaves)."""

    def output_uri(self, spec: JobSpec) -> str:
        return field_value(spec, self.output)

    def input_uris(self, spec: JobSpec) -> dict[str, str]:
        """The artifacts it reads, as {dotted field: URI}."""
        return {f: field_value(spec, f) for f in self.reads(spec)}

    def settings(self, spec: JobSpec) -> Any:
        return getattr(spec, self.section)

    def impl(self) -> ModuleType:
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name == self.module:
                raise ConfigError(f"stage {self.name!r} is not implemented yet in this version of diclip") from e
            raise

    def run(self, spec: JobSpec) -> dict:
        return dict(self.impl().run(spec) or {})

    def is_complete(self, spec: JobSpec) -> bool:
        return bool(self.impl().is_complete(spec))

    def stale(self, spec: JobSpec) -> list[str]:
        return list(self.impl().stale(spec))


def _train_reads(spec: JobSpec) -> tuple[str, ...]:
    stored = ("train.correlation",) if spec.train.mode == "stored" else ()
    return ("data.root", "train.cache") + stored


def _evaluate_reads(spec: JobSpec) -> tuple[str, ...]:
    e = spec.evaluate
    stored = ("evaluate.correlation",) if e.cam and e.maps == "stored" else ()
    return ("data.root", "evaluate.checkpoint") + stored


STAGES: tuple[Stage, ...] = (
    Stage("synthesize", "write the synthetic demo dataset (VOC layout) into data.root", "synthesize",
          "data.root", _fields(), "ray_jobs.stages.synthesize", needs_ray=False),
    Stage("generate", "text-to-image single-class images for the KV cache (Ray Data, diffusers)", "generate",
          "generate.output", _fields(), "ray_jobs.stages.generate"),
    Stage("mask", "foreground masks for generated images with the training-free CAM path", "mask",
          "mask.output", _fields("mask.images"), "ray_jobs.stages.mask", pictures="preview.png"),
    Stage("cache", "CLIP features inside masks -> per-class k-means -> KV cache (safetensors)", "cache",
          "cache.output", _fields("cache.images", "cache.masks"), "ray_jobs.stages.cache"),
    Stage("correlate", "diffusion attention + ACR for every dataset image -> compact shards", "correlate",
          "correlate.output", _fields("data.root"), "ray_jobs.stages.correlate", pictures="preview.png",
          prepares_inputs=True),
    Stage("train", "adapter + segmenter with Ray Train + DeepSpeed", "train",
          "train.output", _train_reads, "ray_jobs.stages.train"),
    Stage("evaluate", "CAM pseudo-label and segmentation mIoU, pictures", "evaluate",
          "evaluate.output", _evaluate_reads, "ray_jobs.stages.evaluate", pictures="pictures.png",
          prepares_inputs=True),
    Stage("infer", "masks for a folder/bucket of new images", "infer",
          "infer.output", _fields("infer.checkpoint", "infer.input"), "ray_jobs.stages.infer", pictures="overlays"),
)
"""Every stage, in pipeline order (the names are :data:`diclip.stage_names.STAGE_NAMES`)."""

_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def get(name: str) -> Stage:
    """The stage called ``name``; an unknown name is a one-line error listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(_BY_NAME)}") from None


def is_stage(name: str) -> bool:
    return name in _BY_NAME
