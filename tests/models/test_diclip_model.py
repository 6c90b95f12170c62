import pytest
import torch

from diclip.config import MethodConfig
from diclip.data import get_class_set
from diclip.errors import ModelError
from diclip.method.acr import refine_correlation
from diclip.method.pseudo import rar_transition
from diclip.models.adapter import KVAdapter
from diclip.models.attention_capture import DiffusionAttention
from diclip.models.clip import build_clip
from diclip.models.diclip_model import DiCLIP
from diclip.models.diffusion import build_diffusion_from_config
from diclip.models.kv_cache import load_cache, save_cache
from tests.helpers import random_cache, tiny_model_config

CLASSES = get_class_set("synthetic")


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_model_config()
    clip = build_clip(cfg.clip)
    cache = random_cache(clip.embed_dim, list(CLASSES.classes))
    return cfg, clip, cache


def test_adapter_is_initialised_from_the_cache(parts):
    _, clip, cache = parts
    a = KVAdapter(cache.keys, cache.values, hidden=32)
    m = cache.num_entries
    assert torch.equal(a.fc1.weight[:m], cache.keys)
    assert torch.equal(a.fc2.weight[:, :m], cache.values.t())
    assert a.fc1.weight[m:].abs().max() <= 2.0
    with pytest.raises(ModelError) as e:
        KVAdapter(cache.keys, cache.values, hidden=m - 1)
    assert "adapter_size" in str(e.value)


def test_cache_roundtrip_and_mismatch(tmp_path, parts, storage_root):
    _, clip, cache = parts
    save_cache(f"{storage_root}/cache", cache)
    loaded = load_cache(f"{storage_root}/cache", clip.embed_dim, list(CLASSES.classes))
    assert torch.equal(loaded.keys, cache.keys) and torch.equal(loaded.values, cache.values)
    with pytest.raises(ModelError) as e:
        load_cache(f"{storage_root}/cache", 512, list(CLASSES.classes))
    assert "dim 64" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError) as e:
        load_cache(f"{storage_root}/cache", 64, list(get_class_set("voc").classes))
    assert "class" in str(e.value)
    with pytest.raises(ModelError):
        load_cache(f"{storage_root}/missing", 64)


def test_model_rejects_mismatched_cache(parts):
    cfg, clip, _ = parts
    bad = random_cache(32, list(CLASSES.classes))
    with pytest.raises(ModelError):
        DiCLIP(clip, CLASSES, bad, cfg, MethodConfig())


def test_forward_backward_only_adapter_and_segmenter_learn(parts):
    cfg, clip, cache = parts
    torch.manual_seed(0)
    model = DiCLIP(clip, CLASSES, cache, cfg, MethodConfig(seg_attn_from_iter=0))
    pipe = build_diffusion_from_config(cfg.diffusion)
    diff = DiffusionAttention(pipe, cfg.diffusion)
    images = torch.rand(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    cap = diff(images, [0, 1])
    corr = refine_correlation(cap.vce, size=cap.clip_grid)
    rar = rar_transition(cap.rar_dense(), heads=(0, 1))
    model.train()
    out = model(images, corr)
    assert out.cam.shape == (2, 16, 4) and out.seg_logits.shape == (2, 5, 4, 4)
    scores, pl = model.pseudo_labels(out, rar, labels, (64, 64), gate=True, rar_grid=cap.rar_grid)
    assert pl.shape == (2, 64, 64)
    assert set(pl[1].unique().tolist()) <= {0, 2}
    losses = model.losses(out, pl, step=10)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    trainable = {id(p) for m in model.trainable_modules().values() for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_adapter_cam_switch_and_seg_only(parts):
    cfg, clip, cache = parts
    model = DiCLIP(clip, CLASSES, cache, cfg, MethodConfig()).eval()
    x = torch.rand(1, 3, 64, 64)
    a = model(x, use_adapter_cam=False).cam
    b = model(x, use_adapter_cam=True).cam
    assert a.shape == b.shape and not torch.allclose(a, b)
    seg = model(x, seg_only=True)
    assert seg.cam is None and seg.seg_logits.shape == (1, 5, 4, 4)


def test_trainable_state_roundtrip(parts):
    cfg, clip, cache = parts
    m1 = DiCLIP(clip, CLASSES, cache, cfg, MethodConfig())
    torch.manual_seed(123)
    m2 = DiCLIP(clip, CLASSES, cache, cfg, MethodConfig())
    m2.load_trainable_state_dict(m1.trainable_state_dict())
    for k, v in m1.trainable_state_dict().items():
        assert torch.equal(v, m2.trainable_state_dict()[k])
