"""Training losses of the reference (``get_seg_loss``, ``get_aff_loss``) and the affinity labels.

Weights and schedule (reference ``scripts/train_voc.py``; configured in ``MethodConfig``):
``loss = 1.0 * balanced_seg_loss(segmenter) + 0.1 * affinity_loss + 0.1 * balanced_seg_loss(adapter)``,
all active from the first iteration; affinity labels come from the pseudo-labels (VOC) or from the
segmenter's own prediction after ``aff_label_from_seg_iter`` (COCO: 80k).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_seg_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy averaged separately over background and foreground pixels, then halved.

    logits [B, C, H, W], label [B, H, W] (0 = background, ``ignore_index`` ignored). Balancing keeps
    the (usually dominant) background from swamping the foreground classes.
    """
    label = label.long()
    bg = torch.where(label == 0, label, torch.full_like(label, ignore_index))
    fg = torch.where((label != 0), label, torch.full_like(label, ignore_index))
    # cross_entropy is nll_loss(log_softmax(logits)); the log-softmax is shared by both terms (same values;
    # the two terms' gradients have disjoint support, so their sum before its backward is exact too)
    logp = F.log_softmax(logits, dim=1)
    ce_bg = F.nll_loss(logp, bg, ignore_index=ignore_index, reduction="none")
    ce_fg = F.nll_loss(logp, fg, ignore_index=ignore_index, reduction="none")
    bg_loss = ce_bg.sum() / ((bg != ignore_index).sum() + 1e-6)
    fg_loss = ce_fg.sum() / ((fg != ignore_index).sum() + 1e-6)
    return 0.5 * (bg_loss + fg_loss)


def affinity_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean_pos(1 - pred) + 0.5 * mean_neg(pred)``; pred [B, N, N] in (0, 1), label in {0, 1, 255}."""
    pos = (label == 1).to(pred.dtype)
    neg = (label == 0).to(pred.dtype)
    pos_loss = (pos * (1 - pred)).sum() / (pos.sum() + 1)
    neg_loss = (neg * pred).sum() / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss


def radius_mask(h: int, w: int, radius: int, device: torch.device | None = None) -> torch.Tensor:
    """[hw, hw] bool: token pairs within Chebyshev distance ``radius`` on an h x w grid."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)


def affinity_labels(
    label_map: torch.Tensor, grid: tuple[int, int], radius: int = 8, ignore_index: int = 255
) -> torch.Tensor:
    """Token-pair labels from a label map [B, H, W]: 1 same class, 0 different, ``ignore_index`` outside
    the radius window or where either token is ignored. Nearest-resized to the token grid first.
    (The diagonal stays 1, as with the definition of ``cams_to_affinity_label`` the reference uses.)
    """
    b = label_map.shape[0]
    small = F.interpolate(label_map[:, None].float(), size=tuple(grid), mode="nearest").reshape(b, -1)
    aff = (small[:, :, None] == small[:, None, :]).long()
    window = radius_mask(grid[0], grid[1], radius, label_map.device)
    aff = aff.masked_fill(~window[None], ignore_index)
    ign = small == ignore_index
    aff = aff.masked_fill(ign[:, None, :] | ign[:, :, None], ignore_index)
    return aff


def segmenter_affinity(feats: torch.Tensor) -> torch.Tensor:
    """Predicted token affinity ``sigmoid(3 * (cos - mean(cos)))`` from fused features [B, C, h, w].

    The mean runs over the whole batch tensor, as in the reference.
    """
    f = F.normalize(feats.flatten(2), dim=1)
    cos = f.transpose(1, 2) @ f
    return torch.sigmoid(3.0 * (cos - cos.mean()))
