"""Pseudo-labels from CAMs: CLIP-affinity propagation inside CAM boxes, RAR random walk, labels.

Pipeline per image (reference ``refine_cams_with_aff`` -> ``recursive_refinement_with_diff_attn`` ->
``cam_to_label_iseg``), batched over images and classes here:

1. :func:`clip_affinity` - mean attention of CLIP's last layers (optionally gated by the segmenter's
   predicted affinity), made doubly stochastic and squared by :func:`sinkhorn_transition`.
2. :func:`box_masks` - boxes around the connected regions of each CAM above ``threshold * max``;
   :func:`caa_refine` propagates the CAM with the affinity restricted to those boxes.
3. :func:`rar_walk` - random walk of the refined CAM on the diffusion model's high-resolution
   softmax self-attention (the contract function).
4. :func:`rar_cams` upsamples to the label size, :func:`cams_to_label` adds background = 1 - max fg.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

_TINY = 1e-12


def _real(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (keeps float64 for exact checks; fp16/bf16 maps are upcast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _side(n: int) -> int:
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise ValueError(f"{n} tokens do not form a square grid; pass the grid explicitly")
    return s


def _grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        s = _side(n)
        return s, s
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not match {n} tokens")
    return int(grid[0]), int(grid[1])


# ----------------------------------------------------------------------------------------------
# 1. CLIP affinity
# ----------------------------------------------------------------------------------------------
def clip_affinity(attn_weights: torch.Tensor, layers: int = 6, seg_attn: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-to-patch affinity from CLIP attention [B, L, 1+N, 1+N] -> [B, N, N].

    Without ``seg_attn``: mean over the last ``layers`` layers. With the segmenter's affinity
    ``seg_attn`` [B, N, N]: keep the layers whose total difference ``sum(seg_attn - W_l)`` is at most
    the mean difference, average them and multiply by ``seg_attn`` (reference, from iteration 4000).
    """
    w = _real(attn_weights[:, -layers:, 1:, 1:])
    if seg_attn is None:
        return w.mean(1)
    seg_attn = seg_attn.to(w.dtype)
    diff = (seg_attn[:, None] - w).flatten(2).sum(-1)  # [B, L]
    keep = (diff <= diff.mean(1, keepdim=True)).float()[:, :, None, None]
    w = (keep * w).sum(1) / (keep.sum(1) + 1e-5)
    return w * seg_attn


def sinkhorn_transition(aff: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """Column- then row-normalise ``rounds`` times, symmetrise, square: [B, N, N] -> [B, N, N]."""
    t = aff
    for _ in range(rounds):
        t = t / t.sum(dim=-2, keepdim=True)
        t = t / t.sum(dim=-1, keepdim=True)
    t = (t + t.transpose(-1, -2)) / 2
    return t @ t


# ----------------------------------------------------------------------------------------------
# 2. boxes + propagation
# ----------------------------------------------------------------------------------------------
def connected_components(binary: torch.Tensor, max_iters: int | None = None) -> torch.Tensor:
    """8-connected component labels of binary maps [..., h, w] -> int64 labels (0 = off, >0 = comp).

    Each on-pixel starts with its own index and repeatedly takes the max over its 3x3
    neighbourhood until nothing changes (a label-propagation flood fill that runs batched on GPU).
    """
    shape = binary.shape
    h, w = shape[-2:]
    on = binary.reshape(-1, 1, h, w).float()
    lab = torch.arange(1, h * w + 1, device=binary.device, dtype=torch.float32).reshape(1, 1, h, w) * on
    for _ in range(max_iters or h * w):
        new = F.max_pool2d(lab, 3, stride=1, padding=1) * on
        if torch.equal(new, lab):
            break
        lab = new
    return lab.long().reshape(shape)


def box_masks(cams: torch.Tensor, threshold: float) -> torch.Tensor:
    """Union of the bounding boxes of every region of each map above ``threshold * max``.

    cams [..., h, w] in [0, 1] -> {0, 1} float masks. Follows the reference's OpenCV recipe exactly:
    the map is quantised to uint8 (``cam * 255`` truncated), thresholded strictly above
    ``int(threshold * max)``, and each 8-connected region's box ``[x, x + w)`` is clipped at
    ``width - 1`` (so the last row and column never lie inside a box).
    """
    shape = cams.shape
    h, w = shape[-2:]
    flat = cams.reshape(-1, h, w)
    q = (flat.float() * 255).clamp(0, 255).to(torch.uint8).float()
    thr = torch.floor(threshold * q.amax(dim=(-1, -2), keepdim=True))
    binary = q > thr
    labels = connected_components(binary).reshape(flat.shape[0], h * w)  # [M, hw]
    m = flat.shape[0]
    ys = torch.arange(h, device=cams.device).repeat_interleave(w).expand(m, -1)
    xs = torch.arange(w, device=cams.device).repeat(h).expand(m, -1)
    big = h * w + 1
    kw = dict(dim=1, index=labels, reduce="amin", include_self=True)
    y0 = torch.full((m, big), big, device=cams.device, dtype=torch.long).scatter_reduce(src=ys, **kw)
    x0 = torch.full((m, big), big, device=cams.device, dtype=torch.long).scatter_reduce(src=xs, **kw)
    kw["reduce"] = "amax"
    y1 = torch.full((m, big), -1, device=cams.device, dtype=torch.long).scatter_reduce(src=ys, **kw)
    x1 = torch.full((m, big), -1, device=cams.device, dtype=torch.long).scatter_reduce(src=xs, **kw)
    y1 = (y1 + 1).clamp(max=h - 1)
    x1 = (x1 + 1).clamp(max=w - 1)
    y0[:, 0], x0[:, 0] = big, big  # label 0 is "off", never a region
    r = torch.arange(h, device=cams.device)
    c = torch.arange(w, device=cams.device)
    rows = ((r[None, None] >= y0[..., None]) & (r[None, None] < y1[..., None])).float()  # [M, big, h]
    cols = ((c[None, None] >= x0[..., None]) & (c[None, None] < x1[..., None])).float()  # [M, big, w]
    inside = rows.transpose(1, 2) @ cols  # [M, h, w]
    return (inside > 0).float().reshape(shape)


def caa_refine(
    cams: torch.Tensor,
    transition: torch.Tensor,
    threshold: float,
    labels: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Propagate CAMs [B, N, K] with the affinity ``transition`` [B, N, N] inside each class's boxes.

    ``refined[:, i, k] = sum_j T[i, j] * box_k[j] * cam[j, k]``. Classes absent from ``labels``
    [B, K] (when given) come back as zeros.
    """
    b, n, k = cams.shape
    h, w = _grid(n, grid)
    boxes = box_masks(cams.transpose(1, 2).reshape(b, k, h, w), threshold).reshape(b, k, n).transpose(1, 2)
    refined = transition.to(cams.dtype) @ (boxes * cams)
    if labels is not None:
        refined = refined * (labels > 0).to(refined.dtype)[:, None, :]
    return refined


# ----------------------------------------------------------------------------------------------
# 3. RAR
# ----------------------------------------------------------------------------------------------
def _min_sum_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x - x.amin(dim=-2, keepdim=True)
    return x / x.sum(dim=-2, keepdim=True).clamp_min(_TINY)


def rar_transition(attn: torch.Tensor, heads: Sequence[int] = (1, 2)) -> torch.Tensor:
    """Random-walk transition from softmax attention [B, H, M, M] -> [B, M, M].

    Mean of the chosen heads, divided by its column max, plus ``0.02 * log10(e * P)`` where P > 0
    (which zeroes entries below ~2.5% of the column max), clamped at 0 and row-normalised.
    """
    p = _real(attn[:, list(heads)]).mean(1)
    return rar_transition_from_mean(p)


def rar_transition_from_mean(p: torch.Tensor) -> torch.Tensor:
    """:func:`rar_transition` for an already head-averaged map [B, M, M] (or one map [M, M]).

    Runs one map at a time with in-place updates of its own temporaries (the input is never
    modified): the values are those of ``p / colmax``, ``where(p > 0, 0.02 * log10(e * p), 0)``,
    clamp, row-normalise, but without allocating several fresh [B, M, M] tensors (40 MB each at
    full size) per call. (With autograd recording, the same formula runs out of place.)"""
    if p.requires_grad and torch.is_grad_enabled():
        p = p / p.amax(dim=-2, keepdim=True).clamp_min(_TINY)
        p = (p + torch.where(p > 0, 0.02 * torch.log10(math.e * p.clamp_min(_TINY)), torch.zeros_like(p))).clamp_min(0)
        return p / p.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if p.dim() > 2:
        for i in range(p.shape[0]):
            _rar_transition_into(p[i], out[i])
    else:
        _rar_transition_into(p, out)
    return out


def _rar_transition_into(p: torch.Tensor, out: torch.Tensor) -> None:
    torch.div(p, p.amax(dim=-2, keepdim=True).clamp_min(_TINY), out=out)
    bonus = out.clamp_min(_TINY).mul_(math.e).log10_().mul_(0.02).masked_fill_(~(out > 0), 0.0)
    out.add_(bonus).clamp_min_(0)
    del bonus
    out.div_(out.sum(dim=-1, keepdim=True).clamp_min(_TINY))


def rar_walk_with_transition(
    cam: torch.Tensor,
    transition: torch.Tensor,
    steps: int = 5,
    grid: tuple[int, int] | None = None,
    attn_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """RAR random walk given a prepared transition [B, M, M]; cam [B, N, K] -> [B, M, K]."""
    b, n, k = cam.shape
    h, w = _grid(n, grid)
    ah, aw = _grid(transition.shape[-1], attn_grid)
    x = _real(cam).transpose(1, 2).reshape(b, k, h, w)
    x = F.interpolate(x, size=(ah, aw), mode="bilinear", align_corners=False).reshape(b, k, ah * aw).transpose(1, 2)
    x = _min_sum_normalize(x)
    t = transition.to(x.dtype)
    for _ in range(steps):
        x = _min_sum_normalize(t @ x)
    return x


def rar_walk(
    cam: torch.Tensor,
    attn: torch.Tensor,
    heads: Sequence[int] = (1, 2),
    steps: int = 5,
    grid: tuple[int, int] | None = None,
    attn_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """RAR random walk (DESIGN contract): cam [B, N, K], softmax attention [B, H, M, M] -> [B, M, K].

    CAM columns are resized bilinearly from the sqrt(N) grid to the sqrt(M) attention grid, made
    non-negative and summing to one over tokens, then walked ``steps`` times with
    :func:`rar_transition`, re-normalising after every step. (Non-square grids: pass ``grid`` and
    ``attn_grid``.)
    """
    return rar_walk_with_transition(cam, rar_transition(attn, heads), steps, grid, attn_grid)


# ----------------------------------------------------------------------------------------------
# 4. label maps
# ----------------------------------------------------------------------------------------------
def rar_cams(
    walked: torch.Tensor,
    labels: torch.Tensor,
    out_size: tuple[int, int],
    attn_grid: tuple[int, int] | None = None,
    inter_size: tuple[int, int] | None = (512, 512),
) -> torch.Tensor:
    """Walked maps [B, M, K] -> CAMs [B, K, H, W] at ``out_size``, absent classes zeroed.

    As the reference: bilinear to ``inter_size`` (512 x 512), min-max per class over pixels, then
    bilinear to the label size. ``inter_size=None`` resizes once (cheaper, nearly identical).
    """
    b, m, k = walked.shape
    ah, aw = _grid(m, attn_grid)
    x = walked.transpose(1, 2).reshape(b, k, ah, aw)
    if inter_size is not None:
        x = F.interpolate(x, size=inter_size, mode="bilinear", align_corners=False)
        # interpolate keeps the input's channels-last layout, over which a reduction on (h, w) is strided
        # and slow: min/max (exact) are taken on a contiguous copy; updates run in place on the fresh output
        dense = x.contiguous()
        lo = dense.amin(dim=(-1, -2), keepdim=True)
        hi = dense.sub_(lo).amax(dim=(-1, -2), keepdim=True)  # the max of x - lo
        del dense
        x = x.sub_(lo).div_(hi.clamp_min(_TINY))
        x = x.mul_((labels > 0).to(x.dtype)[:, :, None, None])
    else:
        x = x * (labels > 0).to(x.dtype)[:, :, None, None]
    return F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)


def cams_to_label(cams: torch.Tensor, labels: torch.Tensor, threshold: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard label map with background = 1 - max foreground (reference ``cam_to_label_iseg``, bkg_thre=0).

    cams [B, K, H, W] (foreground only), labels [B, K] -> (scores [B, 1+K, H, W], label [B, H, W]).
    Each map is shifted to min 0 and divided by ``max + 1e-6``; classes with label <= ``threshold``
    are zeroed; there is no ignore region.
    """
    b, k, h, w = cams.shape
    x = cams.reshape(b, k, -1)
    x = x - x.amin(dim=-1, keepdim=True)
    x = x.div_(x.amax(dim=-1, keepdim=True) + 1e-6)
    x = x.reshape(b, k, h, w).mul_((labels > threshold).to(x.dtype)[:, :, None, None])
    scores = torch.cat([1 - x.amax(dim=1, keepdim=True), x], dim=1)
    # argmax over a channels-last copy: the same first-maximum index, far faster on CPU than a strided
    # reduction over dim 1
    return scores, scores.permute(0, 2, 3, 1).contiguous().argmax(dim=-1)


def pseudo_labels(
    cams: torch.Tensor,
    clip_attn: torch.Tensor,
    rar_trans: torch.Tensor,
    labels: torch.Tensor,
    out_size: tuple[int, int],
    *,
    grid: tuple[int, int] | None = None,
    attn_grid: tuple[int, int] | None = None,
    seg_attn: torch.Tensor | None = None,
    caa_threshold: float = 0.79,
    caa_layers: int = 6,
    rar_steps: int = 5,
    label_threshold: float = 0.4,
    inter_size: tuple[int, int] | None = (512, 512),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full pseudo-label path for a batch: CAMs [B, N, K] -> (scores [B, 1+K, H, W], label [B, H, W]).

    ``clip_attn`` [B, L, 1+N, 1+N] is CLIP's per-layer attention, ``rar_trans`` [B, M, M] the RAR
    transition (see :func:`rar_transition`), ``labels`` [B, K] the image-level multi-hot labels.
    """
    trans = sinkhorn_transition(clip_affinity(clip_attn, caa_layers, seg_attn))
    refined = caa_refine(_real(cams), trans.to(_real(cams).dtype), caa_threshold, labels, grid)
    walked = rar_walk_with_transition(refined, rar_trans, rar_steps, grid, attn_grid)
    full = rar_cams(walked, labels, out_size, attn_grid, inter_size)
    return cams_to_label(full, labels, label_threshold)
