import torch
import torch.nn.functional as F

from diclip.method import cam
from tests.method import loop_reference as ref


def _feats(b=2, n=16, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, 1 + n, c, generator=g, dtype=torch.float64)
    return f / f.norm(dim=1, keepdim=True)


def _text(t, c=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def test_surgery_matmul_form_equals_broadcast():
    f, t = _feats(), _text(7)
    torch.testing.assert_close(cam.surgery_similarity(f, t), ref.surgery_broadcast(f, t))


def test_surgery_cam_minmax_includes_cls_then_drops_it():
    f, t = _feats(), _text(7)
    got = cam.surgery_cam(f, t, num_fg=4)
    want = ref.minmax_tokens(ref.surgery_broadcast(f, t))[:, 1:, :4]
    assert got.shape == (2, 16, 4)
    torch.testing.assert_close(got, want)


def _cache(num_classes=4, per_class=3, bg=2, c=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    m = bg + (num_classes - 1) * per_class
    keys = torch.randn(m, c, generator=g, dtype=torch.float64)
    cls = torch.tensor([0] * bg + [k for k in range(1, num_classes) for _ in range(per_class)])
    values = F.one_hot(cls, num_classes).double()
    return keys, values


def test_retrieval_cam_equals_loop_reference():
    keys, values = _cache()
    f, t = _feats(), _text(3 + 2)  # 3 fg rows + 2 background words
    got = cam.knowledge_retrieval_cam(keys, values, f, t, num_classes=4)
    want = ref.retrieval_loop(keys, values, f, t, 4)
    assert got.shape == (2, 16, 3)
    torch.testing.assert_close(got, want)
    assert got.min() >= 0 and got.max() <= 1
    # min-max per class over tokens: every class map spans [0, 1]
    torch.testing.assert_close(got.amax(1), torch.ones(2, 3, dtype=got.dtype))


def test_retrieval_weights_only_route_entries_to_their_own_class():
    keys, values = _cache()
    w = cam.retrieval_weights(keys, values, _text(5), 4)
    assert torch.all(w[values == 0] == 0)
    torch.testing.assert_close(w.sum(0), torch.ones(4, dtype=w.dtype))


def test_retrieval_cam_lights_up_tokens_that_match_a_class_key():
    c, n = 11, 16
    keys = torch.eye(c, dtype=torch.float64)  # 2 background + 3 classes x 3 entries, orthonormal
    cls = torch.tensor([0, 0] + [k for k in range(1, 4) for _ in range(3)])
    values = F.one_hot(cls, 4).double()
    g = torch.Generator().manual_seed(0)
    f = torch.rand(1, 1 + n, c, generator=g, dtype=torch.float64) * 0.05
    f[0, 1 + 3, 5] = 1.0  # token 3 looks exactly like cache entry 5 (class 2)
    f[0, 1 + 9, 0] = 1.0  # token 9 looks like a background entry
    got = cam.knowledge_retrieval_cam(keys, values, f, _text(5, c=c), num_classes=4)
    assert got[0, :, 1].argmax() == 3  # class 2 is foreground column 1
    assert got[0, 9, 1] < 0.5
    # Routing to class 2 ignores the keys of other classes.
    keys2 = keys.clone()
    keys2[8:] = torch.randn(3, c, dtype=torch.float64)
    w1 = cam.retrieval_weights(keys, values, _text(5, c=c), 4)
    w2 = cam.retrieval_weights(keys2, values, _text(5, c=c), 4)
    torch.testing.assert_close(w1[:, 2], w2[:, 2])


def test_retrieval_dimension_mismatch():
    keys, values = _cache(c=6)
    try:
        cam.knowledge_retrieval_cam(keys, values, _feats(c=8), _text(5), 4)
    except ValueError as e:
        assert "dim 6" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_fusion_and_adapter_cam_ranges():
    s = torch.rand(2, 16, 3)
    r = torch.rand(2, 16, 3)
    fused = cam.fuse_cams(s, r, 0.5)
    torch.testing.assert_close(fused, ref.minmax_tokens(0.5 * r + s))
    logits = torch.randn(2, 16, 4)
    a = cam.adapter_cam(s, logits, 0.1)
    torch.testing.assert_close(a, ref.minmax_tokens(0.1 * F.relu(logits[..., 1:]) + s))
    assert torch.isfinite(cam.minmax(torch.zeros(1, 5, 2))).all()
