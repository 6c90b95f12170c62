"""Diffusion correlation post-processing and ACR (attention clustering refinement).

The diffusion UNet's self-attention ``q k^T`` (per head, on the CLIP token grid) is normalised,
thresholded and chained over two heads into ``M`` (N x N). ACR clusters the tokens by the symmetric
KL divergence between their attention distributions (columns of ``M``) and replaces every row of ``M``
by the mean row of its cluster. The result is fully described by the cluster id of each token and
one row per cluster, which is how the ``correlate`` stage stores it (``CompactCorrelation``).

Two precisions for the clustering distances:

* ``reference`` (default): the reference computes the symmetric KL in **float16** (its inputs are
  cast to fp16 and ``1e-5`` is added in fp16), and fp16 rounding decides many near-ties of the
  nearest-anchor ``argmin``: an fp32 computation changes ~0-1% of the co-membership entries. This
  path runs the same operations per image (broadcast KL in fp16, boolean-indexed anchor means), so
  the clusters are the reference's.
* ``fp32``: batched over images with the KL expanded into matmuls (no [A, P, D] broadcast), faster
  and device-independent, but not bit-compatible with the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

Size = int | tuple[int, int]


def _grid_hw(size: Size, n: int) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h * w != n:
        raise ValueError(f"token grid {h}x{w} does not match N={n}")
    return h, w


def anchor_indices(size: Size, num_clusters: int = 9, device: torch.device | None = None) -> torch.Tensor:
    """Token indices of the initial anchors: a regular grid with step ``side // sqrt(num_clusters)``.

    With size 20 and 9 clusters the step is 6, giving rows/cols {0, 6, 12, 18}: 16 anchors (the
    reference's arithmetic, kept as is). The step is at least 1 so tiny grids still work.
    """
    h, w = (size, size) if isinstance(size, int) else size
    root = math.sqrt(num_clusters)
    rows = torch.arange(0, h, max(1, int(h // root)), device=device)
    cols = torch.arange(0, w, max(1, int(w // root)), device=device)
    return (rows[:, None] * w + cols[None, :]).flatten()


def normalize_attention(attn: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Column-max normalise, zero entries below ``threshold``, row-normalise (last two dims)."""
    attn = attn / (attn.amax(dim=-2, keepdim=True) + 1e-5)
    attn = torch.where(attn < threshold, torch.zeros_like(attn), attn)
    return attn / (attn.sum(dim=-1, keepdim=True) + 1e-5)


def chain_heads(attn: torch.Tensor, heads: Sequence[int] = (1, 2)) -> torch.Tensor:
    """``A[h0] @ A[h1] @ ...`` over the chosen heads: [B, H, N, N] -> [B, N, N]."""
    out = attn[:, heads[0]]
    for h in heads[1:]:
        out = out @ attn[:, h]
    return out


def symmetric_kl(anchors: torch.Tensor, points: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``0.5 KL(a||x) + 0.5 KL(x||a)`` between every anchor and every point.

    anchors [B, A, D], points [B, P, D] -> [B, A, P]. Written as
    ``0.5 * sum((a - x) * (log a - log x))`` expanded into matmuls, so memory is O(A*P + P*D)
    instead of the reference's O(A*P*D) broadcast.
    """
    a = anchors + eps
    x = points + eps
    la, lx = a.log(), x.log()
    aa = (a * la).sum(-1)  # [B, A]
    xx = (x * lx).sum(-1)  # [B, P]
    cross = a @ lx.transpose(-1, -2) + la @ x.transpose(-1, -2)  # [B, A, P]
    return 0.5 * (aa[:, :, None] + xx[:, None, :] - cross)


def symmetric_kl_fp16(anchors: torch.Tensor, points: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The reference's symmetric KL, in float16 as it computes it: anchors [A, D], points [P, D] -> [A, P]."""
    a = anchors.to(torch.float16) + eps
    x = points.to(torch.float16) + eps
    a, x = a[:, None, :], x[None, :, :]
    q = a.log() - x.log()
    return (a * q).sum(-1) * 0.5 + (-(x * q).sum(-1) * 0.5)


def _cluster_ids_reference(m: torch.Tensor, num_clusters: int, iters: int, size: Size) -> torch.Tensor:
    """One map [N, N] -> compact cluster ids [N], with the reference's fp16 distances and per-cluster means."""
    h, w = _grid_hw(size, m.shape[-1])
    x = m.transpose(0, 1).float()
    x = torch.where(x == 0, torch.full_like(x, 1e-6), x)
    anchors = x[anchor_indices((h, w), num_clusters, device=m.device)]
    assign = torch.zeros(x.shape[0], dtype=torch.long, device=m.device)
    for _ in range(iters):
        assign = torch.min(symmetric_kl_fp16(anchors, x), dim=0).indices
        anchors = torch.stack([x[assign == u].mean(0) for u in assign.unique()])
    return torch.searchsorted(assign.unique(), assign)


def cluster_ids(
    m: torch.Tensor, num_clusters: int = 9, iters: int = 5, size: Size = 20, dtype: torch.dtype | None = None,
    precision: str = "reference",
) -> torch.Tensor:
    """KL k-means of the tokens' attention columns; returns compact cluster ids [B, N] (int64).

    Token ``i`` is described by column ``i`` of ``m`` (row ``i`` of ``m^T``); exact zeros become 1e-6.
    Each iteration assigns tokens to the nearest anchor (first one on ties) and moves each anchor to
    the mean of its tokens; anchors that lose all tokens vanish. Ids are renumbered 0..k-1 in order of
    the surviving anchors, like the reference's ``unique`` relabelling.
    """
    squeeze = m.dim() == 2
    if squeeze:
        m = m[None]
    b, n, _ = m.shape
    _grid_hw(size, n)
    if precision == "reference":
        ids = torch.stack([_cluster_ids_reference(mm, num_clusters, iters, size) for mm in m])
        return ids[0] if squeeze else ids
    if precision != "fp32":
        raise ValueError(f"ACR precision must be reference|fp32, got {precision!r}")
    dtype = dtype or torch.promote_types(m.dtype, torch.float32)
    x = m.transpose(-1, -2).to(dtype)
    x = torch.where(x == 0, torch.full_like(x, 1e-6), x)
    idx = anchor_indices(size, num_clusters, device=m.device)
    anchors = x[:, idx]  # [B, A, N]
    alive = torch.ones(b, idx.numel(), dtype=torch.bool, device=m.device)
    assign = torch.zeros(b, n, dtype=torch.long, device=m.device)
    for _ in range(iters):
        dist = symmetric_kl(anchors, x)
        dist = dist.masked_fill(~alive[:, :, None], float("inf"))
        assign = dist.argmin(dim=1)  # [B, N]
        onehot = torch.nn.functional.one_hot(assign, idx.numel()).to(dtype).transpose(1, 2)  # [B, A, N]
        counts = onehot.sum(-1)  # [B, A]
        alive = counts > 0
        anchors = (onehot @ x) / counts.clamp_min(1)[:, :, None]
    # Renumber surviving clusters 0..k-1 (ascending anchor order).
    present = torch.zeros(b, idx.numel(), dtype=torch.long, device=m.device)
    present.scatter_(1, assign, 1)
    new_id = present.cumsum(1) - 1
    ids = new_id.gather(1, assign)
    return ids[0] if squeeze else ids


def comembership(ids: torch.Tensor) -> torch.Tensor:
    """Binary co-membership ``S[i, j] = 1`` iff tokens i and j share a cluster: [..., N] -> [..., N, N]."""
    return (ids[..., :, None] == ids[..., None, :]).float()


def cluster_affinity(m: torch.Tensor, num_clusters: int = 9, iters: int = 5, size: Size = 20,
                     precision: str = "reference") -> torch.Tensor:
    """ACR co-membership matrix of one correlation map (DESIGN contract): [N, N] -> [N, N] in {0, 1}."""
    return comembership(cluster_ids(m, num_clusters, iters, size, precision=precision)).to(m.dtype)


@dataclass
class CompactCorrelation:
    """ACR-refined map in exact compact form: ``R[b, i] = rows[b, ids[b, i]]``.

    ids [B, N] uint8 (cluster of each token), rows [B, K, N] (one row per cluster; K is the max
    cluster count in the batch, unused rows are zero), grid (h, w) of the token grid.
    """

    ids: torch.Tensor
    rows: torch.Tensor
    grid: tuple[int, int]

    def expand(self) -> torch.Tensor:
        return expand_compact(self.ids, self.rows)


def expand_compact(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Exact N x N map from cluster ids [B, N] and cluster rows [B, K, N]."""
    index = ids.long()[:, :, None].expand(-1, -1, rows.shape[-1])
    return rows.gather(1, index)


def cluster_rows(m: torch.Tensor, ids: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """Rows of ``rounds`` refinement rounds ``R <- (S @ R) / (S.sum(-1) + 1e-6)`` starting at ``R = m``.

    After the first round every row equals its cluster's row sum over ``n + 1e-6`` (n = cluster
    size); each later round multiplies by ``n / (n + 1e-6)``. So the final row of cluster c is
    ``sum_{j in c} m[j] * n^(r-1) / (n + 1e-6)^r`` - computed here once per cluster.
    """
    b, n, _ = m.shape
    k = int(ids.max().item()) + 1 if ids.numel() else 1
    onehot = torch.nn.functional.one_hot(ids.long(), k).to(m.dtype).transpose(1, 2)  # [B, K, N]
    sums = onehot @ m  # [B, K, N]
    counts = onehot.sum(-1, keepdim=True)  # [B, K, 1]
    if rounds <= 0:
        raise ValueError("rounds must be >= 1 for the compact form")
    factor = counts.pow(rounds - 1) / (counts + 1e-6).pow(rounds)
    return sums * factor


def refine_correlation_compact(
    attn: torch.Tensor,
    heads: Sequence[int] = (1, 2),
    threshold: float = 0.2,
    num_clusters: int = 9,
    iters: int = 5,
    size: Size = 20,
    rounds: int = 3,
    precision: str = "reference",
) -> CompactCorrelation:
    """VCE input in compact form from raw per-head ``q k^T`` maps [B, H, N, N]."""
    n = attn.shape[-1]
    grid = _grid_hw(size, n)
    a = normalize_attention(attn[:, list(heads)].to(torch.promote_types(attn.dtype, torch.float32)), threshold)
    m = chain_heads(a, tuple(range(len(heads))))
    ids = cluster_ids(m, num_clusters, iters, grid, precision=precision)
    rows = cluster_rows(m, ids, rounds)
    if rows.shape[1] > 256:
        raise ValueError("more than 256 clusters cannot be stored as uint8 ids")
    return CompactCorrelation(ids=ids.to(torch.uint8), rows=rows, grid=grid)


def refine_correlation(
    attn: torch.Tensor,
    heads: Sequence[int] = (1, 2),
    threshold: float = 0.2,
    num_clusters: int = 9,
    iters: int = 5,
    size: Size = 20,
    precision: str = "reference",
) -> torch.Tensor:
    """ACR-refined correlation map (DESIGN contract): [B, H, N, N] -> [B, N, N]."""
    return refine_correlation_compact(attn, heads, threshold, num_clusters, iters, size,
                                      precision=precision).expand()
