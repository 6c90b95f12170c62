"""CAM mIoU of a trained model with its VCE and RAR maps swapped, shuffled or kept: what each map is worth.

Why: the end-to-end ablation rows retrain everything, so a row differs from another by training noise as
well as by the part it removes. Holding the trained model fixed and changing only the map a part reads
isolates that part: the same model, the same images, the same CAM code (``cam_pseudo_labels``, what
the evaluate stage's ``cam`` task runs), one map replaced. Used by ``bench/quality.py`` (the "maps:"
rows) and by the quality test's wiring check (a map whose tokens are shuffled must lose points against
the real one: a part that reads the wrong tokens, or none, shows up).

A *variant* maps the stored maps of a batch to the pair fed to the CAM code:
``fn(images, corr, rar_transition, rar_grid, clip_grid) -> (corr, rar_transition)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple, tuple], tuple[torch.Tensor, torch.Tensor]]


def stored(images, corr, rar, rar_grid, clip_grid):
    """The maps as stored by ``correlate`` (what the pipeline uses)."""
    return corr, rar


def shuffle_tokens(m: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``m`` [B, N, N] with its tokens relabelled by one fixed random permutation (rows and columns
    alike): the same values - still row-stochastic where ``m`` is - at the wrong places."""
    n = m.shape[-1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(m.device)
    return m[:, perm][:, :, perm]


def rar_shuffled(images, corr, rar, rar_grid, clip_grid):
    return corr, shuffle_tokens(rar)


def vce_shuffled(images, corr, rar, rar_grid, clip_grid):
    return shuffle_tokens(corr), rar


def vce_off(images, corr, rar, rar_grid, clip_grid):
    """No VCE map: CLIP Surgery's attention alone (the model's ``corr=None`` path)."""
    return None, rar


def rar_off(images, corr, rar, rar_grid, clip_grid):
    """The identity as the walk's transition: the walk leaves the CAM as it is."""
    eye = torch.eye(rar.shape[-1], dtype=rar.dtype, device=rar.device)
    return corr, eye.expand_as(rar)


def colour_maps(sigma: float = 0.1, vce: bool = True, rar: bool = True) -> Variant:
    """The colour-affinity control in place of the VCE map, the RAR map, or both."""
    from diclip.method.attention_grouping import colour_affinity
    from diclip.method.pseudo import rar_transition_from_mean

    def fn(images, corr, rar_t, rar_grid, clip_grid):
        c = colour_affinity(images, clip_grid, sigma) if vce else corr
        r = rar_transition_from_mean(colour_affinity(images, rar_grid, sigma)) if rar else rar_t
        return c, r
    return fn


@dataclass
class CamRuns:
    """The images' ground truth and, per variant, each image's ``CamResult`` (pseudo-label, refined scores)."""

    classes: list[str]
    masks: list[np.ndarray]
    results: dict[str, list]

    def miou(self, name: str) -> float:
        return miou(self.masks, self.results[name], self.classes)

    def score_change(self, name: str, reference: str) -> float:
        return score_change(self.results[reference], self.results[name])


def cam_results(spec, variants: dict[str, Variant], batch: int = 16) -> CamRuns:
    """Every variant's CAM pseudo-labels on ``spec.evaluate.cam_split`` from the model exported at
    ``spec.evaluate.checkpoint``, with the evaluate stage's CAM settings (CAA threshold, RAR steps, adapter CAM)."""
    from diclip.data.datasets import open_split
    from diclip.inference import MapSource, cam_pseudo_labels, load_exported_model, resize_square

    model, mspec, card = load_exported_model(spec.evaluate.checkpoint, "cpu", dataset=spec.data.dataset)
    size = int(card.get("crop_size") or mspec.data.crop_size)
    clip_grid = (size // model.encoder.patch, size // model.encoder.patch)
    source = MapSource("stored", mspec, model.encoder.patch, "cpu", spec.evaluate.correlation)
    ds = open_split(spec.data, spec.evaluate.cam_split)
    masks: list[np.ndarray] = []
    out: dict[str, list] = {name: [] for name in variants}
    for start in range(0, len(ds.ids), batch):
        samples = [ds.load(i) for i in ds.ids[start:start + batch]]
        sizes = [s.image.shape[:2] for s in samples]
        images = torch.stack([resize_square(s.image, size, "cpu") for s in samples])
        labels = torch.from_numpy(np.stack([s.label for s in samples])).float()
        corr, rar, rar_grid = source([s.id for s in samples], images, sizes)
        masks += [s.mask for s in samples]
        for name, fn in variants.items():
            c, r = fn(images, corr, rar, rar_grid, clip_grid)
            out[name] += cam_pseudo_labels(model, images, labels, c, r, rar_grid, sizes,
                                           caa_threshold=spec.evaluate.cam_caa_threshold,
                                           rar_steps=spec.evaluate.cam_rar_steps,
                                           use_adapter_cam=spec.evaluate.cam_adapter)
    return CamRuns(list(ds.class_set.classes), masks, out)


def miou(masks: list[np.ndarray], results: list, classes: list[str]) -> float:
    """mIoU of the pseudo-labels ``results`` against ``masks`` (the evaluate stage's metric)."""
    from diclip.method import metrics

    k = len(classes)
    cm = np.zeros((k, k), np.int64)
    for mask, r in zip(masks, results):
        cm += metrics.confusion_matrix(mask, r.label, k)
    return float(metrics.summarize(cm, classes)["miou"])


def score_change(a: list, b: list) -> float:
    """Mean absolute difference of the refined CAM scores of two variants' results (same images): how much
    one map moved the CAMs, whatever it did to the thresholded labels."""
    return float(np.mean([np.abs(x.scores - y.scores).mean() for x, y in zip(a, b)]))


def cam_mious(spec, variants: dict[str, Variant], batch: int = 16) -> dict[str, float]:
    """CAM mIoU on ``spec.evaluate.cam_split``, once per variant (:func:`cam_results`)."""
    runs = cam_results(spec, variants, batch)
    return {name: runs.miou(name) for name in variants}
