"""Inference from a trained export: model loading, multi-scale + flip segmentation, CAM pseudo-labels.

Everything here is a function of a model and a batch of images (no Ray, no stage I/O besides loading
the export), so the ``evaluate`` and ``infer`` stages, notebooks and tests share one code path.

**Export layout** (written by ``ray_jobs/stages/train.py::export`` or :func:`save_export`):
``model.safetensors`` (adapter.* + segmenter.* = ``DiCLIP.trainable_state_dict()``), ``cache/`` (KV
cache), ``spec.yaml`` (the merged training spec: CLIP/diffusion ids and every model size) and
``card.json`` (classes, dataset, clip id, crop size, steps, mode). CLIP and diffusion weights are not
copied; they are found where the spec names them.

**Segmentation** (reference ``tools/infer_seg_voc.py`` / ``infer_seg_coco.py``): the whole image is
resized (aspect not kept) to squares of ``round(size * s)`` pixels for every scale ``s`` (rounded to a
multiple of the patch size, which the ViT needs; 0.7/1.0/1.2/1.5 x 320 are exact), the segmenter alone
runs on the batch and on its horizontal flip, each scale's logits are resized to ``work_ratio`` x the
image size (0.4 VOC, 0.2 COCO), averaged over flips and scales, upsampled to the image size and
arg-maxed. The reference VOC script ignores the flipped logits at scale 1.0 (a quirk; COCO does not):
``evaluate.voc_flip_quirk`` reproduces it by default, configs/coco.yaml turns it off, and
:func:`multiscale_logits` itself averages the flip at every scale unless asked for the quirk.
Dense CRF (on in the VOC/COCO protocol): :mod:`diclip.method.crf`.

**CAM pseudo-labels** (reference ``tools/infer_lam.py``): the image resized to the crop square, one
full forward with the VCE correlation, CLIP-affinity propagation inside CAM boxes without segmenter
gating (``caa_threshold`` 0.88), RAR random walk (10 steps), background = 1 - max foreground, at the
ground-truth size; no multi-scale, no flip.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diclip import storage
from diclip.config import JobSpec
from diclip.errors import ConfigError, DiclipError, ModelError
from diclip.logging import get_logger

if TYPE_CHECKING:
    from diclip.data.classes import ClassSet

log = get_logger("diclip.inference")

MODEL_FILE = "model.safetensors"
CACHE_DIR = "cache"
SPEC_FILE = "spec.yaml"
CARD_FILE = "card.json"
FORMAT = "diclip-trainable-v1"


# ----------------------------------------------------------------------------------------------
# export artifact
# ----------------------------------------------------------------------------------------------
def spec_from_yaml(text: str, source: str) -> JobSpec:
    """A :class:`JobSpec` from a dumped spec (``to_yaml``), validated like any job spec."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(JobSpec), OmegaConf.create(text))
        spec = OmegaConf.to_object(cfg)
    except DiclipError as e:
        raise ModelError(f"{source}: invalid training spec: {e}") from e
    except ConfigKeyError as e:  # written by a diclip whose config has keys this one lacks (or the reverse)
        key = getattr(e, "full_key", None) or "?"
        raise ModelError(f"{source}: training spec has key {key!r} that this diclip version does not know; "
                         f"use the diclip version that exported it or re-export the model") from e
    except Exception as e:  # yaml syntax, wrong types
        raise ModelError(f"{source}: corrupt training spec ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); re-export the model") from e
    if not isinstance(spec, JobSpec):
        raise ModelError(f"{source}: not a diclip job spec")
    return spec


@dataclass
class ExportInfo:
    """What a driver learns about an export without building the model."""

    uri: str
    spec: JobSpec
    card: dict
    fingerprint: str
    """sha1 of the trainable weights and the cache: a re-trained export at the same URI differs."""

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def crop_size(self) -> int:
        return int(self.card.get("crop_size") or self.spec.data.crop_size)


def _missing(uri: str, what: str) -> ModelError:
    return ModelError(f"no exported model at {uri} ({what} missing); run the train stage first or point "
                      "the checkpoint setting at a train export directory")


def read_export(uri: str, dataset: "str | ClassSet | None" = None) -> ExportInfo:
    """Check an export's files and class list; cheap (no model is built). One-line errors."""
    for name in (MODEL_FILE, SPEC_FILE, CARD_FILE):
        if not storage.exists(storage.join(uri, name)):
            raise _missing(uri, name)
    cache_file = storage.join(uri, CACHE_DIR, "kv_cache.safetensors")
    if not storage.exists(cache_file):
        raise _missing(uri, f"{CACHE_DIR}/kv_cache.safetensors")
    try:
        card = storage.read_json(storage.join(uri, CARD_FILE))
    except DiclipError as e:
        raise ModelError(f"{storage.join(uri, CARD_FILE)}: corrupt model card ({e}); re-export the model") from e
    if not isinstance(card, dict) or not isinstance(card.get("classes"), list) or len(card["classes"]) < 2:
        raise ModelError(f"{storage.join(uri, CARD_FILE)}: model card has no class list; re-export the model")
    spec = spec_from_yaml(storage.read_text(storage.join(uri, SPEC_FILE)), storage.join(uri, SPEC_FILE))
    h = hashlib.sha1()
    for f in (storage.join(uri, MODEL_FILE), cache_file):
        h.update(storage.read_bytes(f))
    info = ExportInfo(uri, spec, card, h.hexdigest()[:16])
    check_classes(info, dataset)
    return info


def export_class_set(info: ExportInfo) -> "ClassSet":
    """The classes an export was trained with: the card's own copy (exports of a ``data.classes_file``
    carry it, so inference needs no access to that file), else the built-in set its spec names."""
    from diclip.data import get_class_set
    from diclip.data.classes import class_set_from_dict

    if isinstance(info.card.get("class_set"), dict):
        try:
            return class_set_from_dict(info.card["class_set"])
        except (KeyError, TypeError, DiclipError) as e:
            raise ModelError(f"{info.uri}: card.json class_set is corrupt ({e}); re-export the model") from e
    return get_class_set(info.spec.data.dataset)


def check_classes(info: ExportInfo, dataset: "str | ClassSet | None") -> None:
    """The export's classes must be the dataset's (same names, same order: ids are positions)."""
    from diclip.data import get_class_set

    own = export_class_set(info)
    if list(own.classes) != info.classes:
        raise ModelError(f"{info.uri}: card.json classes {info.classes[:4]}... disagree with the training spec's "
                         f"class set {own.name!r}; re-export the model")
    if dataset is None:
        return
    try:
        want = get_class_set(dataset)
    except DiclipError as e:
        raise ConfigError(f"data.dataset: {e}") from e
    if list(want.classes) != info.classes:
        raise ModelError(f"class-list mismatch: the model at {info.uri} was trained on {info.card.get('dataset')!r} "
                         f"({len(info.classes)} classes: {', '.join(info.classes[:5])}...) but the data's class set "
                         f"{want.name!r} has {len(want.classes)} ({', '.join(want.classes[:5])}...); evaluate a model "
                         "trained on this dataset")


def build_model(spec: JobSpec, cache, device: str | torch.device = "cpu", class_set: "ClassSet | None" = None):
    """A fresh :class:`DiCLIP` (frozen CLIP from the spec, trainable parts at init) in eval mode;
    ``class_set`` defaults to the spec's own (``data.classes_file`` or ``data.dataset``)."""
    from diclip.data import class_set_for
    from diclip.models.clip import build_clip
    from diclip.models.diclip_model import DiCLIP

    class_set = class_set or class_set_for(spec.data)
    clip = build_clip(spec.model.clip, device)
    model = DiCLIP(clip, class_set, cache, spec.model, spec.method)
    return model.to(device).eval()


def load_exported_model(export_uri: str, device: str | torch.device = "cpu", spec_override: JobSpec | None = None,
                        *, dataset: "str | ClassSet | None" = None):
    """(DiCLIP in eval mode, spec, card) from a ``train`` export.

    ``spec_override``: build with its ``model`` and ``method`` sections instead of the exported ones
    (e.g. CLIP weights under another local path); the trained weights must still fit. ``dataset``:
    fail with one line unless the export's classes are this dataset's.
    """
    from diclip.models.kv_cache import load_cache

    info = read_export(export_uri, dataset)
    spec = info.spec
    if spec_override is not None:
        spec = dataclasses.replace(spec, model=spec_override.model, method=spec_override.method)
    try:
        tensors, meta = storage.load_tensors(storage.join(export_uri, MODEL_FILE))
    except DiclipError as e:
        raise ModelError(f"corrupt export weights: {e}") from e
    if meta.get("format", FORMAT) != FORMAT:
        raise ModelError(f"{export_uri}/{MODEL_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = build_model(spec, load_cache(storage.join(export_uri, CACHE_DIR)), "cpu", export_class_set(info))
    try:
        model.load_trainable_state_dict(tensors)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:240]
        raise ModelError(f"{export_uri}/{MODEL_FILE} does not fit the model built from the spec "
                         f"({first}); check model.* sizes") from e
    return model.to(device).eval(), spec, info.card


def save_export(uri: str, model, spec: JobSpec, cache, steps: int = 0, mode: str | None = None) -> None:
    """Write an export (same layout as the train stage) for a model; used by tests, benches and tools."""
    from diclip.config import to_yaml
    from diclip.models.kv_cache import save_cache

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    storage.save_tensors(storage.join(uri, MODEL_FILE), state, {"format": FORMAT})
    save_cache(storage.join(uri, CACHE_DIR), cache)
    storage.write_text(storage.join(uri, SPEC_FILE), to_yaml(spec))
    from diclip.data import class_set_for
    from diclip.data.classes import class_set_to_dict

    class_set = class_set_for(spec.data)
    storage.write_json(storage.join(uri, CARD_FILE), {
        "classes": list(class_set.classes),
        "dataset": class_set.name,
        "class_set": class_set_to_dict(class_set),
        "clip": f"{spec.model.clip.name}/{spec.model.clip.pretrained or f'random-seed{spec.model.clip.seed}'}",
        "crop_size": spec.data.crop_size,
        "steps": steps,
        "mode": mode or spec.train.mode,
    })


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def to_tensor(image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1).float().div_(255.0)


def resize_square(image: np.ndarray, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Whole image to a float [3, size, size] tensor in [0, 1] (aspect not kept), as the reference's
    validation and CAM evaluation do: ``F.interpolate`` bilinear, align_corners=False, no antialias."""
    x = to_tensor(image, device)[None]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0]


def scale_sizes(base: int, scales: Sequence[float], multiple: int = 16) -> list[int]:
    """Square side per scale: ``base * s`` rounded to the nearest multiple of the patch size (>= one patch)."""
    return [max(multiple, int(round(base * s / multiple)) * multiple) for s in scales]


def work_size(size: tuple[int, int], ratio: float) -> tuple[int, int]:
    """Size at which the reference averages logits: ``int(H * ratio), int(W * ratio)`` (>= 1)."""
    return max(1, int(size[0] * ratio)), max(1, int(size[1] * ratio))


# ----------------------------------------------------------------------------------------------
# segmentation: multi-scale + flip
# ----------------------------------------------------------------------------------------------
SegForward = Callable[[torch.Tensor], torch.Tensor]


def segmenter_forward(model) -> SegForward:
    """images [B, 3, S, S] in [0, 1] -> segmenter logits [B, K, h, w] (no CAM branch, no diffusion)."""
    return lambda x: model(x, seg_only=True).seg_logits


@torch.no_grad()
def multiscale_logits(forward: SegForward, images: Sequence[torch.Tensor], base: int, scales: Sequence[float],
                      flip: bool = True, work_ratio: float = 0.4, multiple: int = 16,
                      voc_flip_quirk: bool = False) -> list[torch.Tensor]:
    """Scale- and flip-averaged logits [K, h, w] per image at its working size (``work_ratio`` x size).

    ``images``: float [3, H, W] in [0, 1], any sizes. All images of the batch share each scale's
    square input, so the forward runs once per scale on the whole batch (plus its flip).
    """
    sizes = [tuple(int(v) for v in im.shape[-2:]) for im in images]
    works = [work_size(s, work_ratio) for s in sizes]
    acc: list[torch.Tensor | None] = [None] * len(images)
    for s, side in zip(scales, scale_sizes(base, scales, multiple)):
        x = torch.cat([F.interpolate(im[None].float(), size=(side, side), mode="bilinear", align_corners=False)
                       for im in images])
        use_flip = flip and not (voc_flip_quirk and abs(s - 1.0) < 1e-9)
        if use_flip:
            out = forward(torch.cat([x, x.flip(-1)])).float()
            plain, flipped = out[: len(images)], out[len(images):].flip(-1)
        else:
            plain, flipped = forward(x).float(), None
        for i, wsz in enumerate(works):
            lg = F.interpolate(plain[i: i + 1], size=wsz, mode="bilinear", align_corners=False)[0]
            if flipped is not None:
                fl = F.interpolate(flipped[i: i + 1], size=wsz, mode="bilinear", align_corners=False)[0]
                lg = (lg + fl) / 2
            acc[i] = lg if acc[i] is None else acc[i] + lg
    return [a / len(scales) for a in acc]


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] -> [K, H, W] bilinear."""
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def finish_segment(image: np.ndarray, logits: torch.Tensor, crf: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mask, mask before CRF), uint8 class ids at the image's size, from the working-size logits [K, h, w] of
    :func:`multiscale_logits`: bilinear upsampling, arg-max and, with ``crf``, the dense CRF on the softmax.

    With ``crf`` the logits are moved to the CPU (fp32) first, so this is all CPU work wherever it runs: the
    ``evaluate`` stage runs it in Ray Data CPU tasks after the model actors (which ship the logits), and
    :func:`segment` and the in-actor path run the same function, so a GPU's interpolation kernels never make
    them differ: the same masks bit for bit."""
    if crf:
        logits = logits.float().cpu()
    full = upsample(logits, image.shape[:2])
    raw = full.argmax(0).to(torch.uint8).cpu().numpy()
    if not crf:
        return raw, raw
    from diclip.method.crf import dense_crf

    return dense_crf(image, torch.softmax(full, 0).cpu().numpy()), raw


@torch.no_grad()
def segment(forward: SegForward, images: Sequence[np.ndarray], base: int, scales: Sequence[float], *,
            flip: bool = True, work_ratio: float = 0.4, multiple: int = 16, voc_flip_quirk: bool = False,
            crf: bool = False, device: str | torch.device = "cpu",
            raw_out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Masks (uint8 class ids at each image's size) for RGB uint8 images of any sizes.

    ``raw_out``: a list that receives the arg-max before CRF of each image (the reference reports both).
    With ``crf`` the upsampling runs on the CPU (:func:`finish_segment`), where the evaluate stage's CRF
    tasks run it, so a GPU's interpolation kernels never make the two differ."""
    tensors = [to_tensor(im, device) for im in images]
    logits = multiscale_logits(forward, tensors, base, scales, flip, work_ratio, multiple, voc_flip_quirk)
    out = []
    for im, lg in zip(images, logits):
        pred, raw = finish_segment(im, lg, crf)
        if raw_out is not None:
            raw_out.append(raw)
        out.append(pred)
    return out


# ----------------------------------------------------------------------------------------------
# CAM pseudo-labels
# ----------------------------------------------------------------------------------------------
class MapSource:
    """VCE correlation + RAR transition for square inputs: stored (``correlate`` shards) or online."""

    def __init__(self, mode: str, spec: JobSpec, patch: int, device: str | torch.device = "cpu",
                 correlation_uri: str | None = None):
        self.mode = mode
        self.spec = spec
        self.patch = patch
        self.device = torch.device(device)
        self.store = None
        self.diffusion = None
        if mode == "stored":
            from diclip.data.map_shards import CorrelationStore

            if not correlation_uri:
                raise ConfigError("stored maps need a correlation URI (evaluate.correlation)")
            self.store = CorrelationStore(correlation_uri)
        elif mode == "online":
            from diclip.models.attention_capture import DiffusionAttention
            from diclip.models.diffusion import build_diffusion_from_config

            pipe = build_diffusion_from_config(spec.model.diffusion, self.device)
            self.diffusion = DiffusionAttention(pipe, spec.model.diffusion, patch, mean=spec.model.clip.mean,
                                                std=spec.model.clip.std)
        else:
            raise ConfigError(f"maps must be stored|online, got {mode!r}")

    def has(self, item_id: str) -> bool:
        return self.store is None or item_id in self.store

    @torch.no_grad()
    def __call__(self, item_ids: list[str], images: torch.Tensor, src_sizes: list[tuple[int, int]]):
        """(corr [B, N, N], rar transition [B, M, M], rar grid) for ``images`` [B, 3, S, S] (whole images resized)."""
        from diclip.method.pseudo import rar_transition_from_mean

        if self.diffusion is not None:
            from diclip.models.diffusion_maps import noise_seed, rar_mean, vce_compact

            seeds = [noise_seed(i, self.spec.model.diffusion.seed) for i in item_ids]
            cap = self.diffusion(images, seeds)
            corr = vce_compact(cap, self.spec.method, self.spec.model.diffusion).expand().to(self.device)
            return corr, rar_transition_from_mean(rar_mean(cap).float()).to(self.device), cap.rar_grid
        from diclip.data.map_shards import batch_maps
        from diclip.data.transforms import resize_geometry

        records = self.store.get(item_ids)
        h, w = images.shape[-2:]
        clip_grid = (h // self.patch, w // self.patch)
        ratio = records[0].rar_grid[0] // records[0].grid[0]
        rar_grid = (clip_grid[0] * ratio, clip_grid[1] * ratio)
        geoms = [resize_geometry(src, (h, w)) for src in src_sizes]
        vce, rar = batch_maps(records, geoms, clip_grid, rar_grid)
        return vce.to(self.device), rar_transition_from_mean(rar.to(self.device)), rar_grid


@dataclass
class CamResult:
    label: np.ndarray
    """uint8 [H, W] pseudo-label (0 background; no ignore region, as the reference)."""
    scores: np.ndarray
    """float32 [K-1, H, W] refined foreground CAMs in [0, 1] (absent classes are 0)."""


@torch.no_grad()
def cam_pseudo_labels(model, images: torch.Tensor, labels: torch.Tensor, corr: torch.Tensor, rar_trans: torch.Tensor,
                      rar_grid: tuple[int, int], out_sizes: Sequence[tuple[int, int]], *, caa_threshold: float = 0.88,
                      rar_steps: int = 10, use_adapter_cam: bool = False) -> list[CamResult]:
    """Reference LAM evaluation for a batch of crop-square images [B, 3, S, S] with labels [B, K-1]."""
    out = model(images, corr, use_adapter_cam=use_adapter_cam)
    results = []
    for i, size in enumerate(out_sizes):
        one = dataclasses.replace(out, cam=out.cam[i: i + 1], clip_attn=out.clip_attn[i: i + 1],
                                  aff_pred=None if out.aff_pred is None else out.aff_pred[i: i + 1])
        scores, lab = model.pseudo_labels(one, rar_trans[i: i + 1], labels[i: i + 1], tuple(size), gate=False,
                                          rar_grid=rar_grid, rar_steps=rar_steps, caa_threshold=caa_threshold)
        results.append(CamResult(lab[0].to(torch.uint8).cpu().numpy(), scores[0, 1:].float().cpu().numpy()))
    return results


def strongest_class(scores: np.ndarray, label: np.ndarray, threshold: float = 0.4) -> int:
    """Foreground class id (1-based) of the present class with the most CAM mass; 0 if none is present."""
    present = np.flatnonzero(np.asarray(label) > threshold)
    if present.size == 0:
        return 0
    mass = scores[present].reshape(present.size, -1).sum(1)
    return int(present[int(mass.argmax())]) + 1
