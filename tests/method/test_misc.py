import math

import numpy as np
import torch

from diclip.method.kmeans import kmeans
from diclip.method.metrics import confusion_matrix, iou_per_class, markdown_table, summarize
from diclip.method.par import PAR
from diclip.method.schedule import poly_warmup_multiplier


def test_confusion_and_miou_hand_case():
    gt = np.array([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = np.array([[0, 1, 1, 3], [2, 0, 1, 1]])
    cm = confusion_matrix(gt, pred, num_classes=4)
    assert cm.sum() == 7  # ignore pixel dropped
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[2, 0] == 1 and cm[1, 1] == 3
    iou = iou_per_class(cm)
    assert math.isclose(iou[0], 1 / 3) and math.isclose(iou[1], 3 / 4) and math.isclose(iou[2], 1 / 2)
    assert np.isnan(iou[3])  # absent from gt and prediction (the pred 3 was on an ignored pixel)
    s = summarize(cm, ["bg", "a", "b", "c"])
    assert math.isclose(s["miou"], (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert math.isclose(s["pixel_accuracy"], 5 / 7)
    assert s["per_class_iou"]["c"] is None
    assert "| c | - |" in markdown_table(s)


def test_confusion_is_additive():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (4, 10, 10))
    pred = rng.integers(0, 5, (4, 10, 10))
    total = sum(confusion_matrix(g, p, 5) for g, p in zip(gt, pred))
    assert np.array_equal(total, confusion_matrix(gt, pred, 5))


def test_poly_warmup_matches_reference_log():
    assert math.isclose(2e-4 * poly_warmup_multiplier(199, 20000, 50), 1.980e-4, rel_tol=1e-3)
    assert math.isclose(1e-4 * poly_warmup_multiplier(199, 100000, 200), 9.950e-5, rel_tol=1e-3)
    assert math.isclose(poly_warmup_multiplier(0, 100, 10), 1e-6)
    assert poly_warmup_multiplier(100, 100, 10) == 0.0


def test_kmeans_is_sklearns_with_explicit_inits():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centres]).numpy()
    c1, a1 = kmeans(x, 3, seed=1)
    c2, a2 = kmeans(x, 3, seed=1)
    assert np.array_equal(c1, c2) and np.array_equal(a1, a2)
    assert sorted(np.round(c1).tolist()) == sorted(centres.tolist())
    ref = KMeans(n_clusters=3, random_state=1, n_init=10).fit(x.astype(np.float32))  # the reference's call
    assert np.allclose(c1, ref.cluster_centers_) and np.array_equal(a1, ref.labels_)
    c3, _ = kmeans(x[:2], 5)
    assert c3.shape == (2, 2)
    # several inits keep the best inertia: never worse than a single run with the same seed
    y = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    def inertia(c, a):
        return float(((y - c[a]) ** 2).sum())
    assert inertia(*kmeans(y, 6, seed=0, n_init=10)) <= inertia(*kmeans(y, 6, seed=0, n_init=1)) + 1e-3


def test_par_keeps_constant_maps_and_follows_edges():
    par = PAR(dilations=(1, 2), num_iter=5)
    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:] = 1.0  # two colour regions split at column 8
    const = torch.full((1, 2, 16, 16), 0.7)
    # neighbour weights sum to 1 + w_pos, so a constant map scales by 1.01 per iteration (as in ToCo)
    torch.testing.assert_close(par(img, const), const * 1.01**5, rtol=1e-5, atol=1e-6)
    cam = torch.zeros(1, 1, 16, 16)
    cam[..., 8:9] = 1.0  # a line at the edge's right side
    out = par(img, cam)
    assert out[..., 9:].mean() > 5 * out[..., :8].mean()  # spreads within its colour region
