"""k-means for the KV cache's per-class centroids: scikit-learn's ``KMeans``, as the reference.

The reference (``maintain_kv_cache/.../generate_kv_cache.py``) clusters each class's keys with
``sklearn.cluster.KMeans(n_clusters=k, random_state=0)``: k-means++ seeding (sklearn's greedy
variant) and, as sklearn did before 1.4 (the reference pins no version), the best of 10 runs by
inertia. Here the number of runs is explicit (``cache.kmeans_inits``, default 10) so the result does not
depend on the installed sklearn's default.
"""
from __future__ import annotations

import numpy as np


def kmeans(x: np.ndarray, k: int, iters: int = 300, seed: int = 0, n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows of x [n, d] into ``min(k, n)`` centroids; returns (centroids [k', d] float32, labels [n]).

    With fewer points than ``k`` every point is its own centroid (the cache simply gets fewer entries
    for that class). Deterministic for a given seed.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n <= k:
        return x.copy(), np.arange(n)
    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=iters, random_state=seed).fit(x)
    return km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64)
