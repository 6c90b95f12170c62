import math

import torch
import torch.nn.functional as F

from diclip.method import losses


def test_balanced_seg_loss_hand_case():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, 1] = math.log(2.0)  # pixel 1 favours class 1
    label = torch.tensor([[[0, 1, 2, 255]]])
    got = losses.balanced_seg_loss(logits, label)
    p = torch.softmax(logits[0, :, 0], 0)
    bg = -torch.log(p[0, 0])
    fg = (-torch.log(p[1, 1]) - torch.log(p[2, 2])) / 2
    torch.testing.assert_close(got, 0.5 * (bg + fg), rtol=1e-5, atol=1e-6)


def test_balanced_seg_loss_only_background():
    logits = torch.randn(2, 4, 3, 3)
    label = torch.zeros(2, 3, 3, dtype=torch.long)
    want = 0.5 * F.cross_entropy(logits, label)
    torch.testing.assert_close(losses.balanced_seg_loss(logits, label), want, rtol=1e-5, atol=1e-6)


def test_affinity_loss_hand_case():
    pred = torch.tensor([[[0.9, 0.2], [0.4, 0.7]]])
    label = torch.tensor([[[1, 0], [255, 1]]])
    pos = (0.1 + 0.3) / (2 + 1)
    neg = 0.2 / (1 + 1)
    torch.testing.assert_close(losses.affinity_loss(pred, label), torch.tensor(0.5 * pos + 0.5 * neg))


def test_radius_mask_chebyshev():
    m = losses.radius_mask(5, 4, 1)
    for i in range(20):
        for j in range(20):
            near = abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1
            assert bool(m[i, j]) == near


def test_affinity_labels_window_and_ignore():
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    lab[:, :32] = 1
    lab[:, 48:, 48:] = 255
    aff = losses.affinity_labels(lab, (4, 4), radius=1)
    assert aff.shape == (1, 16, 16)
    assert aff[0, 0, 1] == 1 and aff[0, 0, 4] == 1  # same class, inside window
    assert aff[0, 4, 8] == 0  # rows 1 and 2 of the grid: classes 1 vs 0
    assert aff[0, 0, 15] == 255  # outside the radius window
    assert (aff[0, 15] == 255).all() and (aff[0, :, 15] == 255).all()  # ignored token
    assert aff[0, 0, 0] == 1  # diagonal kept


def test_segmenter_affinity_range():
    a = losses.segmenter_affinity(torch.randn(2, 8, 4, 4))
    assert a.shape == (2, 16, 16) and (a > 0).all() and (a < 1).all()
