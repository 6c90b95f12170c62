import pytest
import torch
from safetensors.torch import save_file

from diclip.config import ClipConfig
from diclip.errors import ModelError
from diclip.models.clip import build_clip, class_text_features, encode_texts
from diclip.models.vce import VCEVisionEncoder
from diclip.data import get_class_set


@pytest.fixture(scope="module")
def clip():
    return build_clip(ClipConfig(name="diclip-tiny", pretrained=""))


def test_tiny_clip_is_seeded_and_frozen(clip):
    other = build_clip(ClipConfig(name="diclip-tiny", pretrained=""))
    for a, b in zip(clip.model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert (clip.embed_dim, clip.width, clip.num_layers, clip.patch_size) == (64, 64, 4, 16)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_clip_from_local_checkpoint(tmp_path, clip, suffix):
    src = build_clip(ClipConfig(name="diclip-tiny", pretrained="", seed=5))
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = build_clip(ClipConfig(name="diclip-tiny", pretrained=str(path)))
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded.model.encode_image(x), src.model.encode_image(x))
    assert not torch.allclose(loaded.model.encode_image(x), clip.model.encode_image(x))
    assert loaded.model_id.endswith(str(path))


def test_clip_errors_are_one_line(tmp_path):
    with pytest.raises(ModelError) as e:
        build_clip(ClipConfig(name="diclip-tiny", pretrained=str(tmp_path / "missing.pt")))
    assert "not found" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError) as e:
        build_clip(ClipConfig(name="no-such-model", pretrained=""))
    assert "no-such-model" in str(e.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError):
        build_clip(ClipConfig(name="diclip-tiny", pretrained=str(bad)))


def test_text_features(clip):
    t = class_text_features(clip, get_class_set("voc"), "a clean origami {}.")
    assert t.shape == (20 + 25, 64)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(45))
    a = encode_texts(clip, ["cat"])
    torch.testing.assert_close(a[0], t[7])  # 'cat' is VOC foreground row 7


def test_original_path_matches_open_clip(clip):
    enc = VCEVisionEncoder(clip.model.visual, 3)
    x = torch.randn(2, 3, 224, 224)
    out = enc(x)
    # open_clip's own pooled output = ln_post(CLS of the original path) @ proj
    pooled = clip.model.encode_image(x)
    torch.testing.assert_close(out.features[:, 0], pooled, rtol=1e-4, atol=1e-5)
    assert out.layer_tokens.shape == (4, 2, 197, 64)
    assert out.attn.shape == (2, 4, 197, 197)
    torch.testing.assert_close(out.attn[:, 0].sum(-1), torch.ones(2, 197))  # head mean: rows sum to 1
    torch.testing.assert_close(out.attn[:, -1].sum(-1), torch.full((2, 197), 4.0))  # head sum of 4 heads


def test_zero_map_equals_no_map_and_map_only_touches_surgery_path(clip):
    enc = VCEVisionEncoder(clip.model.visual, 3, features="clean")
    x = torch.randn(2, 3, 320, 320)
    plain = enc(x)
    zero = enc(x, torch.zeros(2, 400, 400))
    assert torch.equal(plain.features, zero.features)
    corr = torch.rand(2, 400, 400)
    withmap = enc(x, corr)
    assert torch.equal(withmap.layer_tokens, plain.layer_tokens)  # original path untouched
    torch.testing.assert_close(withmap.features[:, 0], plain.features[:, 0])  # CLS from original path
    assert not torch.allclose(withmap.features[:, 1:], plain.features[:, 1:])
    fast = enc(x, surgery=False)  # segmentation-only inference: same per-layer tokens, no surgery path
    torch.testing.assert_close(fast.layer_tokens, plain.layer_tokens, rtol=1e-5, atol=1e-6)


def test_reference_segmenter_features_follow_the_in_place_updates(clip):
    """4 blocks, 3 surgery blocks (first = block 1): entry 0 is the final surgery path (CLS from the
    original path), entries 1-2 the original path before the next block's MLP, entry 3 clean."""
    x = torch.randn(2, 3, 320, 320)
    corr = torch.rand(2, 400, 400)
    clean = VCEVisionEncoder(clip.model.visual, 3, features="clean")(x, corr)
    ref = VCEVisionEncoder(clip.model.visual, 3, features="reference")(x, corr)
    torch.testing.assert_close(ref.features, clean.features)
    torch.testing.assert_close(ref.layer_tokens[3], clean.layer_tokens[3])
    blocks = clip.model.visual.transformer.resblocks
    for i in (1, 2):  # x_ori of block i plus block i+1's attention residual = block i+1 output minus its MLP
        nxt = blocks[i + 1]
        pre = ref.layer_tokens[i]
        torch.testing.assert_close(pre + nxt.mlp(nxt.ln_2(pre)), clean.layer_tokens[i + 1], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(pre, clean.layer_tokens[i])
    v = clip.model.visual
    new_path = v.ln_post(ref.layer_tokens[0]) @ v.proj
    torch.testing.assert_close(new_path, ref.features, rtol=1e-4, atol=1e-5)  # the VCE path itself
    # without a map (segmentation-only inference) the surgery path still runs in reference mode
    seg_only = VCEVisionEncoder(clip.model.visual, 3, features="reference")(x, surgery=False)
    no_map = VCEVisionEncoder(clip.model.visual, 3, features="reference")(x)
    torch.testing.assert_close(seg_only.layer_tokens, no_map.layer_tokens)
    assert not torch.allclose(no_map.layer_tokens[0], ref.layer_tokens[0])  # the map reaches entry 0


def test_surgery_block_by_hand(clip):
    """One surgery block computed literally from the formulas."""
    enc = VCEVisionEncoder(clip.model.visual, 1)
    x = torch.randn(1, 3, 64, 64)
    corr = torch.rand(1, 16, 16)
    out = enc(x, corr)
    v = clip.model.visual
    h, _ = enc.embed(x)
    for blk in v.transformer.resblocks[:-1]:
        h = blk(h)
    blk = v.transformer.resblocks[-1]
    y = blk.ln_1(h)
    a = blk.attn
    heads = a.num_heads
    q, k, val = torch.nn.functional.linear(y, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.reshape(1, 17, heads, -1).transpose(1, 2)
    q, k, val = split(q), split(k), split(val)
    s = (64 // heads) ** -0.5
    attn = (q @ q.transpose(-1, -2) * s).softmax(-1) + 2 * (k @ k.transpose(-1, -2) * s).softmax(-1)
    attn[:, :, 1:, 1:] += corr[:, None]
    attn = attn.sum(1, keepdim=True)
    new = a.out_proj(((attn @ val).transpose(1, 2).reshape(1, 17, 64)))
    x_new = h + new
    ori = blk(h)  # standard block = original path
    final = torch.cat([ori[:, :1], x_new[:, 1:]], 1)
    want = v.ln_post(final) @ v.proj
    torch.testing.assert_close(out.features, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size,grid", [((320, 320), (20, 20)), ((224, 288), (14, 18)), ((64, 48), (4, 3))])
def test_position_interpolation_any_multiple_of_16(clip, size, grid):
    enc = VCEVisionEncoder(clip.model.visual, 3)
    out = enc(torch.randn(1, 3, *size))
    assert out.grid == grid and out.features.shape == (1, 1 + grid[0] * grid[1], 64)
    with pytest.raises(ValueError):
        enc(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError):
        enc(torch.randn(1, 3, *size), torch.zeros(1, 7, 7))
