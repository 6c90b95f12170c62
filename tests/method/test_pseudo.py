
import numpy as np
import pytest
import torch

from diclip.method import pseudo
from tests.method import loop_reference as ref


def test_connected_components_8_connectivity():
    b = torch.tensor([[1, 0, 0, 1],
                      [0, 1, 0, 1],
                      [0, 0, 0, 0],
                      [1, 1, 0, 1]], dtype=torch.bool)
    lab = pseudo.connected_components(b)
    assert lab[0, 0] == lab[1, 1]  # diagonal neighbours join
    assert lab[0, 3] == lab[1, 3] and lab[0, 3] != lab[0, 0]
    assert lab[3, 0] == lab[3, 1] and lab[3, 3] != lab[3, 1]
    assert (lab[~b] == 0).all() and (lab[b] > 0).all()
    assert len(lab[b].unique()) == 4


@pytest.mark.parametrize("seed", range(6))
def test_box_masks_equal_opencv_recipe(seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(3, 5, 5, generator=g)
    cams = torch.nn.functional.interpolate(raw[None], size=(20, 20), mode="bilinear")[0]
    cams = (cams - cams.amin((1, 2), keepdim=True)) / (cams.amax((1, 2), keepdim=True) - cams.amin((1, 2), keepdim=True))
    got = pseudo.box_masks(cams, 0.6)
    for i in range(3):
        want = ref.boxes_loop(cams[i].numpy(), 0.6)
        np.testing.assert_array_equal(got[i].numpy(), want)


def test_box_masks_empty_map_gives_no_box():
    assert pseudo.box_masks(torch.zeros(2, 6, 6), 0.5).sum() == 0


def _clip_attn(b, l, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, l, 1 + n, 1 + n, generator=g, dtype=torch.float64).softmax(-1)


def test_caa_refine_equals_loop():
    g = torch.Generator().manual_seed(0)
    b, n, k = 2, 400, 4
    cams = torch.nn.functional.interpolate(torch.rand(b, k, 5, 5, generator=g, dtype=torch.float64), size=(20, 20),
                                           mode="bilinear").flatten(2).transpose(1, 2)
    cams = (cams - cams.amin(1, keepdim=True)) / (cams.amax(1, keepdim=True) - cams.amin(1, keepdim=True))
    attn = _clip_attn(b, 8, n, 1)
    labels = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.float64)
    trans = pseudo.sinkhorn_transition(pseudo.clip_affinity(attn, 6))
    got = pseudo.caa_refine(cams, trans, 0.79, labels)
    for i in range(b):
        want = ref.caa_loop(cams[i], attn[i], labels[i], (20, 20), 0.79)
        present = torch.where(labels[i] > 0)[0]
        for j, c in enumerate(present.tolist()):
            torch.testing.assert_close(got[i, :, c], want[j].reshape(-1))
        absent = torch.where(labels[i] == 0)[0]
        assert (got[i, :, absent] == 0).all()


def test_clip_affinity_with_segmenter_gating():
    attn = _clip_attn(1, 6, 16, 2)
    seg = torch.rand(1, 16, 16, dtype=torch.float64)
    got = pseudo.clip_affinity(attn, 6, seg)
    w = attn[0, :, 1:, 1:]
    d = (seg[0] - w).flatten(1).sum(1)
    keep = d <= d.mean()
    want = (w[keep].sum(0) / (keep.sum() + 1e-5)) * seg[0]
    torch.testing.assert_close(got[0], want)


def _softmax_attn(b, h, m, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, m, m, generator=g, dtype=torch.float64) * 3).softmax(-1)


def test_rar_walk_equals_loop():
    g = torch.Generator().manual_seed(0)
    cam = torch.rand(2, 100, 3, generator=g, dtype=torch.float64)
    attn = _softmax_attn(2, 4, 400, 1)
    got = pseudo.rar_walk(cam, attn, heads=(1, 2), steps=5)
    assert got.shape == (2, 400, 3)
    for i in range(2):
        torch.testing.assert_close(got[i:i + 1], ref.rar_loop(cam[i:i + 1], attn[i], 5))
    torch.testing.assert_close(got.sum(1), torch.ones(2, 3, dtype=got.dtype))


def test_rar_transition_is_row_stochastic_and_sparsifies():
    attn = _softmax_attn(1, 3, 64, 3)
    t = pseudo.rar_transition(attn)
    torch.testing.assert_close(t.sum(-1), torch.ones(1, 64, dtype=t.dtype))
    p = attn[:, [1, 2]].mean(1)
    p = p / p.amax(-2, keepdim=True)
    assert ((p < 0.02) <= (t == 0)).all()  # entries below ~2.5% of the column max vanish


def test_cams_to_label_equals_reference():
    cams = torch.rand(2, 3, 8, 8)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.3, 1.0]])
    s1, l1 = pseudo.cams_to_label(cams, labels)
    s2, l2 = ref.cam_to_label_loop(cams, labels)
    torch.testing.assert_close(s1, s2)
    assert torch.equal(l1, l2)
    assert set(l1[1].unique().tolist()) <= {0, 3}


def test_pseudo_labels_end_to_end_shapes_and_classes():
    b, n, k = 2, 400, 5
    g = torch.Generator().manual_seed(4)
    cams = torch.rand(b, n, k, generator=g)
    attn = _clip_attn(b, 4, n, 5).float()
    rar = pseudo.rar_transition(_softmax_attn(b, 3, 1600, 6).float())
    labels = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    scores, label = pseudo.pseudo_labels(cams, attn, rar, labels, (64, 64))
    assert scores.shape == (b, k + 1, 64, 64) and label.shape == (b, 64, 64)
    assert set(label[0].unique().tolist()) <= {0, 1, 4}
    assert set(label[1].unique().tolist()) <= {0, 3}
    assert torch.isfinite(scores).all()
