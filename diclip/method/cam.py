"""Class activation maps from CLIP patch features: feature surgery, cache retrieval and their fusion.

Shapes: ``feats`` [B, 1+N, C] (row 0 = CLS, already normalised the way the model does it), text
features [T, C] (L2-normalised), cache ``keys`` [M, C] and one-hot ``values`` [M, K] with column 0 =
background. CAMs come back as [B, N, classes] with values in [0, 1] per class over tokens.

Feature surgery (CLIP Surgery) is usually written as a [B, N, T, C] broadcast; since
``sum_c(x_c t_c w_t) - mean_t'(sum_c x_c t'_c w_t')`` equals ``s - mean(s)`` with ``s = (x @ T^T) * w``,
it is computed here with one matmul (same result, C times less memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-12


def minmax(x: torch.Tensor, dim: int | tuple[int, ...] = 1) -> torch.Tensor:
    """``(x - min) / (max - min)`` along ``dim``; constant slices map to 0 instead of NaN."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(_TINY)


def surgery_similarity(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Redundancy-removed similarity of every token to every text row: [B, 1+N, T].

    ``w = softmax(2 * cls @ T^T) / mean`` down-weights classes the whole image is obviously about;
    subtracting the mean over text rows removes what all classes share.
    """
    text = text.to(feats.dtype)
    prob = (2 * feats[:, :1] @ text.t()).softmax(-1)  # [B, 1, T]
    w = prob / prob.mean(-1, keepdim=True)
    s = (feats @ text.t()) * w
    return s - s.mean(-1, keepdim=True)


def surgery_cam(feats: torch.Tensor, text: torch.Tensor, num_fg: int) -> torch.Tensor:
    """Feature-surgery CAM of the first ``num_fg`` text rows: [B, N, num_fg].

    Min-max runs over all 1+N tokens (CLS included) before CLS is dropped, as in the reference.
    """
    return minmax(surgery_similarity(feats, text), dim=1)[:, 1:, :num_fg]


def class_text_with_background(class_text: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[mean of background rows; foreground rows] -> [num_classes, C] (column 0 = background)."""
    fg = class_text[: num_classes - 1]
    bg = class_text[num_classes - 1 :]
    if bg.shape[0] == 0:
        raise ValueError("class_text has no background rows after the num_classes-1 foreground rows")
    return torch.cat([bg.mean(0, keepdim=True), fg], dim=0)


def retrieval_weights(keys: torch.Tensor, values: torch.Tensor, class_text: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How much each cache entry speaks for its class: [M, K], softmax over the entries of each class.

    Entries are scored by similarity to the class text (background: mean of background words); an
    entry only counts for the class its one-hot value names.
    """
    text = class_text_with_background(class_text.to(keys.dtype), num_classes)
    logits = keys @ text.t()  # [M, K]
    logits = logits.masked_fill(values.to(logits.device) == 0, float("-inf"))
    return logits.softmax(0)


def knowledge_retrieval_cam(
    keys: torch.Tensor, values: torch.Tensor, feats: torch.Tensor, class_text: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Training-free CAM by retrieval from the KV cache (DESIGN contract): [B, N, num_classes-1].

    Surgery similarity of tokens to cache keys (ReLU), mapped to classes through
    :func:`retrieval_weights`, min-max per class over tokens; foreground maps are suppressed where
    the background map is high, then ReLU and min-max again.
    """
    if keys.shape[-1] != feats.shape[-1]:
        raise ValueError(f"cache keys have dim {keys.shape[-1]} but features have dim {feats.shape[-1]}")
    if values.shape[-1] != num_classes:
        raise ValueError(f"cache values have {values.shape[-1]} classes, expected {num_classes}")
    keys = keys.to(feats.dtype)
    sim = F.relu(surgery_similarity(feats, keys))  # [B, 1+N, M]
    weights = retrieval_weights(keys, values, class_text, num_classes).to(feats.dtype)
    maps = minmax(sim[:, 1:] @ weights, dim=1)  # [B, N, K]
    fused = F.relu(maps[..., 1:] * (1 - maps[..., :1]))
    return minmax(fused, dim=1)


def fuse_cams(surgery: torch.Tensor, other: torch.Tensor, weight: float) -> torch.Tensor:
    """``minmax(weight * other + surgery)`` over tokens: the retrieval (0.5) or adapter (0.1) fusion."""
    return minmax(weight * other + surgery, dim=1)


def adapter_cam(surgery: torch.Tensor, adapter_logits: torch.Tensor, weight: float = 0.1) -> torch.Tensor:
    """CAM once the trained adapter replaces retrieval: ``minmax(w * relu(adapter_fg) + surgery)``."""
    return fuse_cams(surgery, F.relu(adapter_logits[..., 1:]), weight)
