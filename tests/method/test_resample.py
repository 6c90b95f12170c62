import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diclip.data.transforms import apply_geometry, resize_geometry, sample_geometry
from diclip.method import acr
from diclip.method.codecs import get_codec, nbytes
from diclip.method.resample import (
    Geometry, batch_taps, interpolation_matrix, resample_compact, resample_map, resample_tokens, token_taps,
)


def _stochastic(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, n, generator=g, dtype=torch.float64).softmax(-1)


def test_identity_is_exact():
    r = _stochastic(1, 400)
    geom = Geometry.identity((320, 320))
    idx, w = batch_taps([geom], [(20, 20)], (20, 20))
    out = resample_map(r, idx, w)
    assert torch.equal(out, r)


def test_flip_is_a_permutation():
    r = _stochastic(1, 400, 1)
    geom = Geometry((320, 320), (320, 320), True, (0, 0), (320, 320))
    idx, w = batch_taps([geom], [(20, 20)], (20, 20))
    perm = torch.arange(400).reshape(20, 20).flip(-1).flatten()
    torch.testing.assert_close(resample_map(r, idx, w), r[:, perm][:, :, perm])


def test_crop_is_a_sub_block_and_stays_row_stochastic():
    r = _stochastic(1, 400, 2)
    geom = Geometry((320, 320), (320, 320), False, (64, 32), (160, 160))  # tokens rows 4..13, cols 2..11
    idx, w = batch_taps([geom], [(20, 20)], (10, 10))
    keep = (torch.arange(4, 14)[:, None] * 20 + torch.arange(2, 12)[None]).flatten()
    sub = r[:, keep][:, :, keep]
    out = resample_map(r, idx, w)
    torch.testing.assert_close(out, sub / sub.sum(-1, keepdim=True))
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 100, dtype=out.dtype))


def test_random_geometry_stays_row_stochastic_inside_the_image():
    rng = np.random.default_rng(0)
    r = _stochastic(1, 300, 3)  # 15 x 20 grid over a 240 x 320 image
    for _ in range(10):
        geom = sample_geometry(rng, (240, 320), 160, (1.0, 2.0))
        idx, w = batch_taps([geom], [(15, 20)], (10, 10))
        out = resample_map(r, idx, w)
        inside = w[0].sum(-1) > 0
        torch.testing.assert_close(out[0, inside].sum(-1), torch.ones(int(inside.sum()), dtype=out.dtype))
        assert (out[0, ~inside] == 0).all()


@pytest.mark.parametrize("dst", [(10, 10), (40, 40), (13, 27)])
def test_pure_rescale_matches_f_interpolate(dst):
    x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
    geom = resize_geometry((320, 320), (dst[0] * 16, dst[1] * 16))
    idx, w = token_taps(geom, (20, 20), dst)
    p = interpolation_matrix(idx, w.double(), 400)
    want = F.interpolate(x, size=dst, mode="bilinear", align_corners=False).flatten(2)
    torch.testing.assert_close((p @ x.flatten(2)[0].T).T[None], want)


def test_taps_agree_with_the_image_transform():
    """A linear ramp image transformed by apply_geometry matches token-level resampling."""
    rng = np.random.default_rng(1)
    h, w = 256, 320
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    for _ in range(5):
        geom = sample_geometry(rng, (h, w), 128, (0.8, 1.6))
        ramp = (0.3 * yy + 0.5 * xx) / 3  # stays in [0, 255]
        img = np.repeat(ramp[..., None], 3, -1).astype(np.uint8)
        out = apply_geometry(img, geom).astype(np.float64)[..., 0]
        tokens = torch.from_numpy((0.3 * (np.arange(16)[:, None] * 16 + 8) + 0.5 * (np.arange(20)[None] * 16 + 8)) / 3)
        idx, wt = token_taps(geom, (16, 20), (8, 8))
        got = resample_tokens(tokens.reshape(1, -1, 1), idx[None], wt[None].double())[0, :, 0].reshape(8, 8)
        valid = wt.sum(-1).reshape(8, 8) > 0
        centre = out[8::16, 8::16]
        # interior tokens (away from clamped borders and padding) agree to a couple of grey levels
        inner = valid.numpy().copy()
        inner[[0, -1], :] = False
        inner[:, [0, -1]] = False
        if inner.any():
            assert np.abs(got.numpy()[inner] - centre[inner]).max() < 3.0


def test_compact_resampling_equals_dense():
    attn = torch.rand(2, 3, 400, 400).exp()
    comp = acr.refine_correlation_compact(attn)
    rng = np.random.default_rng(2)
    geoms = [sample_geometry(rng, (320, 320), 320) for _ in range(2)]
    idx, w = batch_taps(geoms, [(20, 20)] * 2, (20, 20))
    dense = resample_map(comp.expand(), idx, w)
    torch.testing.assert_close(resample_compact(comp.ids, comp.rows, idx, w), dense, rtol=1e-4, atol=1e-7)
    ident = batch_taps([Geometry.identity((320, 320))] * 2, [(20, 20)] * 2, (20, 20))
    assert torch.equal(resample_compact(comp.ids, comp.rows, *ident), comp.expand())


@pytest.mark.parametrize("name", ["qk_fp16", "qk_int8", "topk64", "dense_fp16"])
def test_rar_codecs_roundtrip(name):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 400, 8, generator=g) * 2
    k = torch.randn(2, 400, 8, generator=g) * 2
    scale = 8 ** -0.5
    per_head = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    dense = per_head.mean(0)
    codec = get_codec(name)
    item = codec.encode(q, k, scale)
    got = codec.decode([item])[0]
    tol = {"qk_fp16": 2e-3, "qk_int8": 3e-2, "topk64": 5e-2, "dense_fp16": 2e-3}[name]
    assert (got - dense).abs().max() < tol * dense.max()
    assert nbytes(item) < dense.numel() * 2 or name == "dense_fp16"
    geom = Geometry((320, 320), (320, 320), False, (80, 80), (160, 160))
    taps = batch_taps([geom], [(20, 20)], (10, 10))
    cropped = codec.decode([item], taps)[0]
    keep = (torch.arange(5, 15)[:, None] * 20 + torch.arange(5, 15)[None]).flatten()
    if name.startswith("qk"):
        # q/k codecs re-softmax each head over the crop's tokens (what the UNet does on a crop)
        sub = per_head[:, keep][:, :, keep]
        want = (sub / sub.sum(-1, keepdim=True)).mean(0)
    else:
        sub = got[keep][:, keep]  # P R P^T keeps each row's mass
        want = sub / sub.sum(-1, keepdim=True) * got[keep].sum(-1, keepdim=True)
    torch.testing.assert_close(cropped, want, rtol=0.05 if name == "qk_int8" else 1e-3, atol=tol * want.max())
