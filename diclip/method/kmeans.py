"""Seeded k-means in torch (k-means++ init, Lloyd iterations), batched-friendly and deterministic.

Replaces the reference's scikit-learn KMeans(random_state=0) for the cache's per-class centroids so
the reduce step runs on whatever device holds the features and needs no extra dependency.
"""
from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster rows of x [n, d] into ``min(k, n)`` centroids; returns (centroids [k', d], assignment [n]).

    With fewer points than ``k`` every point is its own centroid (the cache simply gets fewer entries
    for that class). Deterministic for a given seed.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    x = x.double()
    k = min(k, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        nxt = int(torch.multinomial(probs.cpu(), 1, generator=g))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        onehot = torch.nn.functional.one_hot(assign, k).double()
        counts = onehot.sum(0)
        new = (onehot.t() @ x) / counts.clamp_min(1)[:, None]
        new = torch.where(counts[:, None] > 0, new, c)  # keep empty clusters where they were
        shift = (new - c).abs().max()
        c = new
        if shift <= tol:
            break
    assign = torch.cdist(x, c).argmin(1)
    return c.float(), assign
