"""Does an attention map group objects? The in-object share of a token's attention, against chance.

Why this exists: DiCLIP's two diffusion parts only help when the diffusion model's self-attention
*groups objects* - VCE adds the map to CLIP's attention so a patch mixes with patches of its own
object, RAR random-walks the CAM along the map so CAM mass spreads inside the object and not across
its border. Whether that premise holds for a given model (the shipped toy UNet, an untrained one,
Stable Diffusion) can be measured directly, without training anything: for every token inside an
object, how much of its attention mass lands on that same object?

Definitions, per image, for an attention map ``A`` [M, M] on a token grid (rows = queries):

* ``coverage[k, j]``: the fraction of token ``j``'s pixels that belong to object ``k`` (0 = background),
  i.e. the object id map average-pooled to the grid (:func:`token_coverage`).
* the *object's tokens*: tokens at least ``inside`` covered by the object (default: a majority).
* a query's *in-object share*: ``sum_j a[i, j] * coverage[k, j]`` with row ``a[i]`` = ``A[i]`` clamped at
  0 and normalised to sum 1 (rows with no mass are skipped). An attention equal to the object's
  indicator gives 1.
* *chance*: the object's area share ``sum_j coverage[k, j] / M`` - exactly what uniform attention
  (or any attention that ignores where the object is) gives.

:func:`object_shares` returns, per object, the mean share over its tokens and its chance;
:func:`summarize` pools objects (share, chance, their ratio: 1 = no grouping); :func:`attention_spread`
says how flat a map is (1 = uniform); :func:`walk_in_object_mass` runs RAR's walk on a perfect CAM and
says how much of it stays in the object. :func:`colour_affinity` is the parameter-free control the
quality bench swaps in for the diffusion maps (``bench/quality.py``'s "colour maps"): what pure colour
similarity scores on the same images. Pure torch, no I/O; ``bench/attention_grouping.py`` applies it to
the toy models and ``correlate``'s preview captions its map panels with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from diclip.method.pseudo import connected_components, rar_walk_with_transition


@dataclass(frozen=True)
class ObjectShare:
    """One object of one image: ``share`` = mean in-object share of its ``tokens`` query tokens,
    ``chance`` = the object's area share of the grid (what uniform attention gives)."""

    object_id: int
    tokens: int
    share: float
    chance: float

    @property
    def ratio(self) -> float:
        return self.share / self.chance if self.chance > 0 else float("nan")


def token_coverage(objects: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Object id map [H, W] (ints, 0 = background) -> coverage [K, M]: the fraction of each grid token
    (``grid`` = (h, w), M = h * w, row-major as the maps) covered by object k, k = 0..max id.

    The map is area-pooled to the grid (``adaptive_avg_pool2d``), so any image size and any grid work
    (an image resized to a square before the model keeps the same pooling)."""
    ids = torch.as_tensor(objects).long()
    if ids.dim() != 2:
        raise ValueError(f"objects must be [H, W], got {tuple(ids.shape)}")
    k = int(ids.max().item()) + 1 if ids.numel() else 1
    onehot = F.one_hot(ids.clamp_min(0), k).permute(2, 0, 1).float()[None]  # [1, K, H, W]
    return F.adaptive_avg_pool2d(onehot, tuple(int(g) for g in grid))[0].flatten(1)


def object_shares(attn: torch.Tensor, coverage: torch.Tensor, inside: float = 0.5) -> list[ObjectShare]:
    """Per object of one image: the mean in-object share of its tokens' attention, and its chance.

    ``attn`` [M, M] (rows = queries; any scale, negatives count as 0), ``coverage`` [K, M] from
    :func:`token_coverage` (row 0 = background, not scored). Objects with no token at least ``inside``
    covered (or whose tokens' rows are all zero) are left out."""
    if attn.dim() != 2 or attn.shape[0] != attn.shape[1] or attn.shape[1] != coverage.shape[-1]:
        raise ValueError(f"attn {tuple(attn.shape)} and coverage {tuple(coverage.shape)} do not match")
    a = attn.float().clamp_min(0)
    total = a.sum(-1)  # [M]
    cov = coverage.float().to(a.device)
    mass = (a @ cov[1:].T) / total.clamp_min(1e-30)[:, None]  # [M, K-1]: each query's share on each object
    m = cov.shape[-1]
    out = []
    for k in range(1, cov.shape[0]):
        q = (cov[k] >= inside) & (total > 0)
        if not bool(q.any()):
            continue
        out.append(ObjectShare(object_id=k, tokens=int(q.sum()), share=float(mass[q, k - 1].mean()),
                               chance=float(cov[k].sum() / m)))
    return out


def summarize(shares: Iterable[ObjectShare]) -> dict[str, float]:
    """Pool objects (of any number of images): mean share, mean chance, their ratio (1 = no grouping),
    the mean of per-object ratios, and the number of objects."""
    s = list(shares)
    if not s:
        return {"share": float("nan"), "chance": float("nan"), "ratio": float("nan"), "mean_ratio": float("nan"),
                "objects": 0}
    share = sum(o.share for o in s) / len(s)
    chance = sum(o.chance for o in s) / len(s)
    return {"share": share, "chance": chance, "ratio": share / chance if chance > 0 else float("nan"),
            "mean_ratio": sum(o.ratio for o in s) / len(s), "objects": len(s)}


def walk_in_object_mass(transition: torch.Tensor, clip_coverage: torch.Tensor, attn_coverage: torch.Tensor,
                        steps: int, clip_grid: tuple[int, int], attn_grid: tuple[int, int]) -> dict[int, float]:
    """RAR's random walk (:func:`~diclip.method.pseudo.rar_walk_with_transition`) of a *perfect* CAM: per
    object of one image, the share of the walked map's mass inside the object after ``steps`` steps.

    The CAM column of object k is its coverage on the CLIP grid (``clip_coverage`` [K, N], as from
    :func:`token_coverage`); ``transition`` [M, M] on ``attn_grid``; ``attn_coverage`` [K, M]. ``steps=0``
    gives the start (the CAM resized to the attention grid). A map that groups objects keeps the mass in
    the object; one that ignores objects spreads it towards the object's area share. Returns
    ``{object id: mass}`` for the objects present (id 0 = background is not an object)."""
    cam = clip_coverage[1:].T.float()[None]  # [1, N, K-1]
    walked = rar_walk_with_transition(cam, transition.float()[None], steps, tuple(clip_grid), tuple(attn_grid))[0]
    return {k: float((walked[:, k - 1] * attn_coverage[k].float()).sum()) for k in range(1, clip_coverage.shape[0])
            if float(clip_coverage[k].sum()) > 0}


def attention_spread(attn: torch.Tensor) -> float:
    """Mean over query rows of the attention's perplexity ``exp(entropy)`` as a fraction of the tokens:
    1 = uniform attention, 1/M = each token attends to one token. Tells a map that ignores objects
    because it is nearly flat from one that is peaked on the wrong tokens. ``attn`` [..., M, M]."""
    a = attn.float().clamp_min(0)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(a * a.clamp_min(1e-30).log()).sum(-1)
    return float(entropy.exp().mean() / a.shape[-1])


def objects_from_class_mask(mask: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """A class-id mask [H, W] -> object ids [H, W]: each 8-connected region of one class is one object
    (0 = background and ``ignore_index``). For datasets that store class masks only: touching objects of
    the same class become one object."""
    m = torch.as_tensor(mask).long()
    out = torch.zeros_like(m)
    next_id = 1
    for c in torch.unique(m).tolist():
        if c == 0 or c == ignore_index:
            continue
        comp = connected_components(m == c)
        for lab in torch.unique(comp).tolist():
            if lab == 0:
                continue
            out[comp == lab] = next_id
            next_id += 1
    return out


def image_grouping(attn: torch.Tensor, grid: tuple[int, int], objects: torch.Tensor,
                   inside: float = 0.5) -> dict[str, float]:
    """:func:`summarize` of one image's map [M, M] on ``grid`` with object ids [H, W] (a preview's caption)."""
    return summarize(object_shares(attn, token_coverage(objects, grid), inside))


def colour_affinity(images: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Row-normalised ``exp(-|rgb_i - rgb_j|^2 / 2 sigma^2)`` between grid cells: [B, N, N].

    ``images`` [B, 3, H, W] in [0, 1], average-pooled to ``grid``. The colour-maps control of
    ``bench/quality.py`` (sigma 0.1): used as the VCE map as is and as the RAR map through
    :func:`~diclip.method.pseudo.rar_transition_from_mean`."""
    c = F.adaptive_avg_pool2d(images.float(), tuple(grid)).flatten(2).transpose(1, 2)  # [B, N, 3] in [0, 1]
    k = torch.exp(-torch.cdist(c, c).pow(2) / (2 * sigma ** 2))
    return k / k.sum(-1, keepdim=True)

