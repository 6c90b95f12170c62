import pytest
import torch

from diclip.method import acr
from tests.method import loop_reference as ref


def random_attn(b=2, h=3, n=400, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    side = int(n ** 0.5)
    # Smooth, blob-structured q/k so the maps have clusters like real diffusion attention.
    q = torch.randn(b, h, 8, side // 4 + 1, side // 4 + 1, generator=g, dtype=dtype)
    q = torch.nn.functional.interpolate(q.flatten(0, 1), size=(side, side), mode="bilinear").reshape(b, h, 8, n)
    k = q + 0.3 * torch.randn(b, h, 8, n, generator=g, dtype=dtype)
    return (q.transpose(-1, -2) @ k).exp() / 10


def test_anchor_grid_matches_reference_arithmetic():
    idx = acr.anchor_indices(20, 9)
    assert idx.tolist() == [r * 20 + c for r in (0, 6, 12, 18) for c in (0, 6, 12, 18)]
    assert acr.anchor_indices(2, 9).numel() == 4  # step clamped to 1 on tiny grids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_affinity_equals_loop(seed):
    attn = random_attn(b=1, seed=seed)
    a = acr.normalize_attention(attn[:, [1, 2]], 0.2)
    m = a[0, 0] @ a[0, 1]
    got = acr.cluster_affinity(m, precision="fp32")  # the loop computes in the input's precision
    want = ref.comembership_loop(ref.cluster_loop(m))
    assert got.shape == (400, 400)
    assert set(got.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(got, want.to(got.dtype))
    assert 1 < ref.cluster_loop(m).max() + 1 <= 16


def test_cluster_ids_batched_equals_per_image():
    attn = random_attn(b=3, seed=5)
    a = acr.normalize_attention(attn[:, [1, 2]], 0.2)
    m = a[:, 0] @ a[:, 1]
    batched = acr.cluster_ids(m, precision="fp32")
    for i in range(3):
        assert torch.equal(batched[i], ref.cluster_loop(m[i]))
    reference = acr.cluster_ids(m.float())
    for i in range(3):
        assert torch.equal(reference[i], acr.cluster_ids(m[i].float()))


@pytest.mark.parametrize("seed", [0, 3])
def test_refine_correlation_equals_loop(seed):
    attn = random_attn(b=2, seed=seed)
    got = acr.refine_correlation(attn, precision="fp32")
    want = ref.refine_loop(attn)
    assert got.shape == (2, 400, 400)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_refine_correlation_float32_close_to_loop():
    attn = random_attn(b=1, seed=7).float()
    torch.testing.assert_close(acr.refine_correlation(attn, precision="fp32"), ref.refine_loop(attn), rtol=1e-4,
                               atol=1e-7)


def test_compact_roundtrip_is_exact_and_small():
    attn = random_attn(b=2, seed=11).float()
    comp = acr.refine_correlation_compact(attn)
    assert comp.ids.dtype == torch.uint8 and comp.ids.shape == (2, 400)
    assert comp.rows.shape[1] <= 16
    dense = comp.expand()
    assert torch.equal(dense, acr.refine_correlation(attn))
    # Rows within one cluster are identical; the map is exactly rows[ids].
    for b in range(2):
        for c in comp.ids[b].unique():
            sel = dense[b][comp.ids[b] == c]
            assert torch.equal(sel, sel[:1].expand_as(sel))
    # fp16 rows (the stored form) expand back exactly to the fp16 dense map.
    half = acr.expand_compact(comp.ids, comp.rows.half())
    assert torch.equal(half, dense.half())


def test_non_square_grid():
    attn = random_attn(b=1, n=400, seed=2)[..., :300, :300]  # 20 x 15 grid
    out = acr.refine_correlation(attn, size=(20, 15), precision="fp32")
    want = ref.refine_loop(attn, size=(20, 15))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        acr.refine_correlation(attn, size=20)


def test_reference_precision_is_the_references_fp16_clustering():
    """The default precision clusters exactly like the oracle's fp16 restatement of attn_kl_cluster;
    fp32 distances decide some near-ties differently (why the reference path exists)."""
    from tests.oracle import reference as oracle

    for seed in range(4):
        attn = random_attn(b=1, seed=seed).float()
        a = acr.normalize_attention(attn[:, [1, 2]], 0.2)
        m = a[0, 0] @ a[0, 1]
        got = acr.cluster_affinity(m)
        assert torch.equal(got, oracle.attn_kl_cluster(m, num_cluster=9, iters=5, size=20))
    with pytest.raises(ValueError, match="reference|fp32"):
        acr.cluster_ids(m, precision="fp64")
