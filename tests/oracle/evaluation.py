"""Independent restatement of the reference's final segmentation evaluation (test side; imports nothing from diclip).

Read from zwyang6/DiCLIP @638f857 ``tools/infer_seg_voc.py`` and ``tools/infer_seg_coco.py`` (``_validate``,
``crf_proc``), the ``DenseCRF`` wrapper they import (``utils/dcrf.py``, the ToCo/AFA one: unary from softmax,
one Gaussian and one bilateral pairwise term, ``inference(iter_max)``), the val datasets they read
(``VOC12SegDataset`` / ``CocoSegDataset`` with ``aug=False``: the whole image at its own size, ImageNet
normalisation on 0..255 pixels, no resize, no padding, no crop; COCO greyscale JPEGs stacked to 3 channels) and
``utils/evaluate.scores`` (ExCEL @925632b):

* per image (batch 1): ``h, w = int(ratio * H), int(ratio * W)`` with ratio 0.4 (VOC) / 0.2 (COCO);
* the 320 square first: the normalised image resized bilinearly (align_corners=False) to 320x320, the model
  run on [x, flip(x)], logits resized to (h, w); VOC keeps only the unflipped half there, COCO averages
  it with the flipped half flipped back (flip after the resize);
* then every other scale ``sc`` of (0.7, 1.0, 1.2, 1.5) in order, ``int(320 * sc)`` square, always
  flip-averaged the same way;
* ``torch.mean(torch.stack(list))``, resized bilinearly to (H, W), argmax: the "raw" prediction;
* CRF: the stacked mean (what ``np.save`` keeps) resized to (H, W), softmax over classes, float32,
  ``unary_from_softmax`` (-log of the probabilities clipped to [1e-5, 1]), ``DenseCRF2D(W, H, C)``,
  ``addPairwiseGaussian(sxy=1, compat=3)``, ``addPairwiseBilateral(sxy=67, srgb=3, rgbim=uint8 image,
  compat=4)``, 10 iterations, argmax of Q;
* mIoU: one confusion histogram over all images (ground truth outside [0, K) - the 255 border - skipped),
  IoU per class, mean over the classes that have ground-truth pixels (``valid = hist.sum(axis=1) > 0``).

The model is a callable ``seg(pixels [B, 3, S, S] ImageNet-normalised) -> logits [B, K, S/16, S/16]``:
``DiCLIP_model(..., eval_seg=True)``; ``tests/release/oracle.eval_seg`` restates it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (123.675, 116.28, 103.53)  # datasets/transforms.normalize_img
STD = (58.395, 57.12, 57.375)
RESIZE = 320  # --resize_size
SCALES = (0.7, 1.0, 1.2, 1.5)  # --scales
CRF = dict(iter_max=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4)  # crf_proc's DenseCRF


class Setting:
    """What differs between the two scripts."""

    def __init__(self, name: str, ratio: float, flip_at_base: bool):
        self.name, self.ratio, self.flip_at_base = name, ratio, flip_at_base


VOC = Setting("voc", 0.4, flip_at_base=False)  # infer_seg_voc.py: seg = segs[0] at the 320 square
COCO = Setting("coco", 0.2, flip_at_base=True)  # infer_seg_coco.py: flip-averaged at every scale


def read_like_reference(image: np.ndarray) -> np.ndarray:
    """``robust_read_image`` (COCO): a 2-D greyscale array becomes three equal channels."""
    image = np.asarray(image)
    if image.ndim < 3:
        image = np.stack((image, image, image), axis=-1)
    return image


def normalize_img(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 HxWx3, per channel (pixel - mean) / std computed in float64."""
    arr = np.asarray(image)
    out = np.empty_like(arr, np.float32)
    for c in range(3):
        out[..., c] = (arr[..., c] - MEAN[c]) / STD[c]
    return out


def _bilinear(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)


@torch.no_grad()
def msc_logits(seg: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, setting: Setting,
               scales: Sequence[float] = SCALES, resize: int = RESIZE) -> torch.Tensor:
    """``_validate``'s ``segs`` for one image: [1, K, int(r*H), int(r*W)] float32."""
    inputs = torch.from_numpy(np.transpose(normalize_img(image), (2, 0, 1)).copy())[None]  # DataLoader, batch 1
    _, _, h, w = inputs.shape
    h, w = int(setting.ratio * h), int(setting.ratio * w)
    seg_list = []

    def both(side: int) -> torch.Tensor:
        x = _bilinear(inputs, (side, side))
        return _bilinear(seg(torch.cat([x, x.flip(-1)], dim=0)).float(), (h, w))

    segs = both(resize)
    seg_list.append((segs[:1] + segs[1:].flip(-1)) / 2 if setting.flip_at_base else segs[0][None])
    for sc in scales:
        if sc != 1.0:
            segs = both(int(resize * sc))
            seg_list.append((segs[:1] + segs[1:].flip(-1)) / 2)
    return torch.mean(torch.stack(seg_list, dim=0), dim=0)


def raw_prediction(segs: torch.Tensor, size) -> np.ndarray:
    """The argmax before CRF at the label size, int16 as the scripts keep it."""
    return torch.argmax(_bilinear(segs, size), dim=1)[0].numpy().astype(np.int16)


def crf_probabilities(segs: torch.Tensor, size) -> np.ndarray:
    """``crf_proc``: the saved logits resized to the image on CPU, softmax over classes: float32 [K, H, W]."""
    logit = torch.FloatTensor(segs.numpy())
    return F.softmax(_bilinear(logit, size), dim=1)[0].numpy()


def dense_crf_q(image: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """``DenseCRF.__call__``: Q [K, H, W] (the script takes its argmax)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = prob.shape
    unary = np.ascontiguousarray(unary_from_softmax(prob))
    image = np.ascontiguousarray(image)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=CRF["pos_xy_std"], compat=CRF["pos_w"])
    d.addPairwiseBilateral(sxy=CRF["bi_xy_std"], srgb=CRF["bi_rgb_std"], rgbim=image, compat=CRF["bi_w"])
    return np.array(d.inference(CRF["iter_max"])).reshape((c, h, w))


def crf_prediction(segs: torch.Tensor, image: np.ndarray) -> np.ndarray:
    """``crf_proc``'s ``pred`` for one image; the image goes through float32 and back to uint8 as there."""
    rgb = read_like_reference(image).astype(np.float32)
    prob = crf_probabilities(segs, rgb.shape[:2])
    return np.argmax(dense_crf_q(rgb.astype(np.uint8), prob), axis=0)


def histogram(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``_fast_hist``: rows ground truth, columns prediction; ground truth outside [0, K) skipped."""
    gt, pred = np.asarray(gt).flatten(), np.asarray(pred).flatten()
    keep = (gt >= 0) & (gt < num_classes)
    return np.bincount(num_classes * gt[keep].astype(int) + pred[keep],
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], num_classes: int) -> dict:
    """``utils/evaluate.scores``: pixel accuracy, IoU per class, mIoU over the classes with ground truth."""
    hist = np.zeros((num_classes, num_classes))
    for gt, pred in zip(gts, preds):
        hist += histogram(gt, pred, num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        iu = np.diag(hist) / (hist.sum(axis=1) + hist.sum(axis=0) - np.diag(hist))
    valid = hist.sum(axis=1) > 0
    return {"pAcc": np.diag(hist).sum() / hist.sum(), "miou": float(np.nanmean(iu[valid])), "iou": iu,
            "hist": hist}


def evaluate(seg: Callable[[torch.Tensor], torch.Tensor], images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
             setting: Setting, num_classes: int, crf: bool = True) -> dict:
    """Both scripts end to end: logits, raw and CRF predictions, and both scores."""
    logits, raw, post = [], [], []
    for image, gt in zip(images, gts):
        segs = msc_logits(seg, read_like_reference(image), setting)
        logits.append(segs)
        raw.append(raw_prediction(segs, gt.shape))
        if crf:
            post.append(crf_prediction(segs, image))
    out = {"logits": logits, "raw": raw, "raw_score": scores(gts, raw, num_classes)}
    if crf:
        out.update(crf=post, crf_score=scores(gts, post, num_classes))
    return out
