import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from diclip.config import DiffusionConfig
from diclip.errors import ModelError
from diclip.models.attention_capture import CaptureProcessor, DiffusionAttention, layer_grid, rar_attention
from diclip.models.diffusion import build_diffusion, build_diffusion_from_config

CFG = DiffusionConfig(source="tiny")


@pytest.fixture(scope="module")
def pipe():
    return build_diffusion_from_config(CFG)


def test_tiny_pipeline_has_reference_layer_names(pipe):
    names = set(pipe.unet.attn_processors)
    assert f"{CFG.vce_layer}.processor" in names and f"{CFG.rar_layer}.processor" in names
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_capture_processor_does_not_change_the_unet(pipe):
    ref = build_diffusion_from_config(CFG)
    ref.unet.set_attn_processor(AttnProcessor2_0())
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 77, 32, generator=g)
    DiffusionAttention(pipe, CFG)  # installs capture processors on two layers
    assert isinstance(pipe.unet.attn_processors[f"{CFG.vce_layer}.processor"], CaptureProcessor)
    with torch.no_grad():
        a = pipe.unet(lat, 10, encoder_hidden_states=enc).sample
        b = ref.unet(lat, 10, encoder_hidden_states=enc).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capture_shapes_seeds_and_sizes(pipe):
    da = DiffusionAttention(pipe, CFG)
    img = torch.rand(2, 3, 320, 320)
    cap = da(img, [1, 2])
    assert cap.vce.shape == (2, 8, 400, 400) and cap.clip_grid == (20, 20)
    assert cap.rar_q.shape == (2, 2, 1600, 8) and cap.rar_grid == (40, 40)
    again = da(img, [1, 2])
    assert torch.equal(cap.vce, again.vce)  # same image + seed -> same map
    other = da(img, [3, 4])
    assert not torch.equal(cap.vce, other.vce)
    dense = cap.rar_dense()
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 2, 1600))
    odd = da(torch.rand(1, 3, 208, 144), [0])  # multiples of 16, not of 64
    assert odd.clip_grid == (13, 9) and odd.vce.shape[-1] == 117
    assert odd.rar_grid == (26, 18)
    with pytest.raises(ValueError):
        da(torch.rand(1, 3, 100, 100), [0])


def test_layer_grid():
    assert layer_grid(100, (40, 40)) == (10, 10)
    assert layer_grid(7 * 5, (26, 18)) == (7, 5)
    with pytest.raises(ValueError):
        layer_grid(17, (40, 40))


def test_load_from_saved_directory(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "sd")
    loaded = build_diffusion(str(tmp_path / "sd"))
    for a, b in zip(loaded.unet.parameters(), pipe.unet.parameters()):
        assert torch.equal(a, b)
    img = torch.rand(1, 3, 64, 64)
    c1 = DiffusionAttention(loaded, CFG)(img, [7])
    c2 = DiffusionAttention(pipe, CFG)(img, [7])
    torch.testing.assert_close(c1.vce, c2.vce)
    torch.testing.assert_close(rar_attention(c1.rar_q, c1.rar_k, c1.rar_scale), c2.rar_dense())


def test_bad_sources(tmp_path):
    with pytest.raises(ModelError) as e:
        build_diffusion(str(tmp_path / "nope"))
    assert "not found" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError):
        build_diffusion(str(tmp_path / "empty"))
    with pytest.raises(ModelError):
        build_diffusion("tiny", dtype="float16")  # no fp16 on CPU
