"""Sanity checks of the reference oracle itself (tests/oracle/reference.py) on a tiny random CLIP."""
from __future__ import annotations

import math

import diclip  # noqa: F401  - repairs torchvision before open_clip is imported

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.oracle import reference as ref

from importlib import resources

TINY_CONFIG = str(resources.files("diclip") / "resources" / "diclip-tiny.json")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_clip():
    open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model("diclip-tiny", pretrained=None, force_quick_gelu=True)
    model.eval()
    return model


def _clean_block_outputs(visual, pixels):
    """Plain open_clip forward, recording every block's output (batch-first)."""
    x = visual._embeds(pixels)
    outs = []
    for blk in visual.transformer.resblocks:
        x = blk(x)
        outs.append(x)
    return outs


def _pixels(b, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def test_clean_path_matches_open_clip(tiny_clip):
    visual = tiny_clip.visual
    pixels = _pixels(2, 224)
    with torch.no_grad():
        feats, weights, all_feats = ref.encode_image(visual, pixels, ex_feats=None, aliasing=False)
        outs = _clean_block_outputs(visual, pixels)
        pooled = visual(pixels)
    n_layers = len(outs)
    assert all_feats.shape == (n_layers, 2, 197, 64)
    assert weights.shape == (n_layers, 2, 197, 197)
    assert feats.shape == (2, 197, 64)
    for i in range(n_layers):  # original path == plain CLIP in every block
        torch.testing.assert_close(all_feats[i], outs[i], atol=2e-5, rtol=1e-5)
    mine = F.layer_norm(all_feats[-1][:, 0], (64,), visual.ln_post.weight, visual.ln_post.bias,
                        visual.ln_post.eps) @ visual.proj
    torch.testing.assert_close(mine, pooled, atol=2e-5, rtol=1e-5)
    # normalisation over the token axis
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, 64), atol=1e-5, rtol=1e-5)

    first = n_layers - 3
    heads = visual.transformer.resblocks[0].attn.num_heads
    ones = torch.ones(2, 197)
    for i in range(n_layers):
        expect = ones if i < first else heads * ones  # head mean vs head sum
        torch.testing.assert_close(weights[i].sum(-1), expect, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        blk0 = visual.transformer.resblocks[0]
        x0 = visual._embeds(pixels)
        _, w0 = blk0.attn(blk0.ln_1(x0), blk0.ln_1(x0), blk0.ln_1(x0), need_weights=True)
    torch.testing.assert_close(weights[0], w0, atol=1e-6, rtol=1e-5)


def test_aliasing_reproduces_in_place_updates(tiny_clip):
    visual = tiny_clip.visual
    blocks = visual.transformer.resblocks
    pixels = _pixels(2, 224, seed=2)
    n = 196
    ex = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(3)) / n
    fa, wa, alias = ref.encode_image(visual, pixels, ex_feats=ex, aliasing=True)
    fc, wc, clean = ref.encode_image(visual, pixels, ex_feats=ex, aliasing=False)
    n_layers = alias.shape[0]
    first = n_layers - 3

    torch.testing.assert_close(fa, fc)  # outputs and weights do not depend on the aliasing
    torch.testing.assert_close(wa, wc)
    torch.testing.assert_close(alias[-1], clean[-1])
    for i in range(first - 1):
        torch.testing.assert_close(alias[i], clean[i])
    # the entry before the first surgery block differs from the clean one ...
    assert not torch.allclose(alias[first - 1], clean[first - 1], atol=1e-3)
    # ... and is the final surgery-path token tensor (CLS from the original path)
    proj = F.layer_norm(alias[first - 1], (64,), visual.ln_post.weight, visual.ln_post.bias,
                        visual.ln_post.eps) @ visual.proj
    torch.testing.assert_close(proj / proj.norm(dim=1, keepdim=True), fa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alias[first - 1][:, 0], clean[-1][:, 0])
    # surgery entries except the last hold the next block's pre-MLP original-path state
    with torch.no_grad():
        for j in range(first, n_layers - 1):
            assert not torch.allclose(alias[j], clean[j], atol=1e-3)
            nxt = blocks[j + 1]
            torch.testing.assert_close(alias[j] + nxt.mlp(nxt.ln_2(alias[j])), clean[j + 1],
                                       atol=2e-5, rtol=1e-5)


def test_ex_feats_changes_only_the_new_path(tiny_clip):
    visual = tiny_clip.visual
    pixels = _pixels(1, 224, seed=4)
    ex = torch.rand(1, 1, 196, 196, generator=torch.Generator().manual_seed(5))
    f0, w0, c0 = ref.encode_image(visual, pixels, None, aliasing=False)
    f1, w1, c1 = ref.encode_image(visual, pixels, ex, aliasing=False)
    torch.testing.assert_close(c0, c1)  # original path untouched
    torch.testing.assert_close(w0, w1)
    assert not torch.allclose(f0[:, 1:], f1[:, 1:], atol=1e-4)


def test_seg_loss_hand_made():
    pred = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]], [[1.0, 3.0, 0.0]]]])  # [1,3,1,3]
    label = torch.tensor([[[0, 2, 255]]])
    lse0 = math.log(math.exp(2) + math.exp(0) + math.exp(1))
    lse1 = math.log(math.exp(0) + math.exp(1) + math.exp(3))
    bg = lse0 - 2.0  # pixel 0, class 0
    fg = lse1 - 3.0  # pixel 1, class 2 (pixel 2 ignored in both)
    expect = 0.5 * (bg / (1 + 1e-6) + fg / (1 + 1e-6))
    got = ref.seg_loss(pred, label)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    torch.testing.assert_close(ref._ce_none(pred, label, 255),
                               F.cross_entropy(pred, label, ignore_index=255, reduction="none"))


def test_aff_loss_hand_made():
    pred = torch.tensor([[[0.9, 0.2], [0.4, 0.7]]])
    lab = torch.tensor([[[1, 0], [255, 1]]])
    expect = 0.5 * ((0.1 + 0.3) / 3) + 0.5 * (0.2 / 2)
    assert ref.aff_loss(pred, lab).item() == pytest.approx(expect, rel=1e-6)


def test_attn_kl_cluster_is_an_equivalence_indicator():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(400, 400, generator=g) ** 4
    m = m / m.sum(-1, keepdim=True)
    c = ref.attn_kl_cluster(m, num_cluster=9, iters=5, size=20)
    assert c.shape == (400, 400)
    assert torch.equal(c, c.T)
    assert set(c.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(torch.diagonal(c), torch.ones(400))
    # transitivity: rows are either identical or disjoint
    assert torch.equal((c @ c > 0).float(), c)
    assert int(torch.linalg.matrix_rank(c)) <= 16  # at most 16 anchors at size 20


def test_attn_kl_cluster_separates_two_groups():
    # columns 0..7 attend to the first half, 8..15 to the second half
    m = torch.zeros(16, 16)
    m[:8, :8] = 1.0 / 8
    m[8:, 8:] = 1.0 / 8
    c = ref.attn_kl_cluster(m, num_cluster=9, iters=5, size=4)
    expect = torch.zeros(16, 16)
    expect[:8, :8] = 1
    expect[8:, 8:] = 1
    assert torch.equal(c, expect)


def test_refine_diffusion_attention_shapes():
    qk = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    out = ref.refine_diffusion_attention(qk, size=8)
    assert out.shape == (2, 1, 64, 64)
    assert torch.isfinite(out).all()


def test_get_mask_by_radius_matches_loops():
    h, w, r = 5, 6, 2
    mask = np.zeros((h * w, h * w))
    for i in range(h * w):
        for y in range(max(0, i // w - r), min(h, i // w + r + 1)):
            for x in range(max(0, i % w - r), min(w, i % w + r + 1)):
                mask[i, y * w + x] = mask[y * w + x, i] = 1
    np.testing.assert_array_equal(ref.get_mask_by_radius(h, w, r), mask)


def test_cams_to_affinity_label_small():
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    lab[0, 32:, :] = 1
    lab[0, :16, :16] = 255
    aff = ref.cams_to_affinity_label(lab, (4, 4), radius=1)
    assert aff.shape == (1, 16, 16)
    assert (aff[0, 0] == 255).all() and (aff[0, :, 0] == 255).all()  # ignored token 0
    assert aff[0, 5, 5] == 1  # diagonal kept
    assert aff[0, 5, 6] == 1  # (1,1) and (1,2): both label 0
    assert aff[0, 5, 10] == 0  # (1,1) label 0 vs (2,2) label 1
    assert aff[0, 5, 15] == 255  # outside radius 1


def test_scoremap2bbox_clips_to_last_index():
    s = np.zeros((6, 6), np.float32)
    s[2:6, 3:6] = 1.0
    boxes, n = ref.scoremap2bbox(s, 0.5)
    assert n == 1
    assert boxes.tolist() == [[3, 2, 5, 5]]  # x1, y1 clipped to width-1 / height-1
    boxes, n = ref.scoremap2bbox(np.zeros((4, 4), np.float32), 0.5)
    assert n == 1 and boxes.tolist() == [[0, 0, 0, 0]]


def _toy_modules(num_classes, width, emb):
    torch.manual_seed(7)

    class Fuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(width, emb, 1)

        def forward(self, tokens):  # [L,B,W,h,w]
            return self.conv(tokens.mean(0))

    clip_dim = 64  # embed_dim of diclip-tiny
    adapter = nn.Module()
    adapter.fc1 = nn.Linear(clip_dim, 8)
    adapter.fc2 = nn.Linear(8, num_classes)
    return Fuse(), nn.Conv2d(emb, num_classes, 1), adapter, clip_dim


@pytest.mark.parametrize("n_iter", [0, 10])
def test_model_forward_and_training_step_smoke(tiny_clip, n_iter):
    visual = tiny_clip.visual
    k = 3
    fuse, decode, adapter, c = _toy_modules(k, 64, 16)
    g = torch.Generator().manual_seed(11)
    text = F.normalize(torch.randn(k - 1 + 3, c, generator=g), dim=-1)
    keys = torch.randn(6, c, generator=g)
    values = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), k).float()
    pixels = _pixels(2, 64, seed=12)
    diff_refined = torch.rand(2, 1, 16, 16, generator=g) / 16
    out = ref.model_forward(visual, text, keys, values, adapter, fuse, decode, pixels, diff_refined,
                            num_classes=k, return_dynamic=True)
    assert out["cam"].shape == (2, 16, k - 1)
    assert out["seg"].shape == (2, k, 4, 4) and out["dynamic"].shape == (2, k, 4, 4)
    assert out["attn_pred"].shape == (2, 16, 16)
    assert out["attn_weights"].shape == (4, 2, 17, 17)
    cam = out["cam"]
    torch.testing.assert_close(cam.amin(1), torch.zeros(2, k - 1))
    torch.testing.assert_close(cam.amax(1), torch.ones(2, k - 1))

    raw = torch.softmax(torch.randn(2, 5, 64, 64, generator=g) * 3, dim=-1)
    cls = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    res = ref.training_step(out, raw, cls, (64, 64), n_iter, caa_thre=0.79, rar_iters=5,
                            seg_attn_from=5, aff_from_seg_iter=5)
    assert res["pseudo"].shape == (2, 64, 64)
    assert set(res["pseudo"].unique().tolist()) <= {0, 1, 2}
    assert not (res["pseudo"][0] == 2).any()  # absent class never labelled
    for key in ("seg_loss", "aff_loss", "dynamic_loss", "loss"):
        assert torch.isfinite(res[key])
    torch.testing.assert_close(res["loss"], res["seg_loss"] + 0.1 * res["aff_loss"] + 0.1 * res["dynamic_loss"])
    res["loss"].backward()
    assert decode.weight.grad is not None and fuse.conv.weight.grad is not None
    assert adapter.fc1.weight.grad is not None


def test_eval_seg_returns_seg_only(tiny_clip):
    visual = tiny_clip.visual
    fuse, decode, adapter, c = _toy_modules(3, 64, 16)
    out = ref.model_forward(visual, None, None, None, adapter, fuse, decode, _pixels(1, 64),
                            torch.ones(1, 1, 16, 16), num_classes=3, return_dynamic=False, eval_seg=True)
    assert out["seg"].shape == (1, 3, 4, 4)
    assert "cam" not in out
    # eval_seg ignores the diffusion map
    f0, _, _ = ref.encode_image(visual, _pixels(1, 64), None)
    torch.testing.assert_close(out["features"], f0)


def test_encode_text_single_template(tiny_clip):
    tokenizer = open_clip.get_tokenizer("diclip-tiny")
    names = ["cat", "dog", "tree"]
    text = ref.encode_text(tiny_clip, tokenizer, names)
    assert text.shape == (3, 64)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        direct = tiny_clip.encode_text(tokenizer([f"a clean origami {n}." for n in names]))
    torch.testing.assert_close(text, F.normalize(direct, dim=-1), atol=1e-5, rtol=1e-5)
