"""The toy diffusion model's grouping objective (``diclip.toy.grouping_objective``): its processor computes
what diffusers' own does, its target is uniform over the query's own instance, and its loss is 0 exactly
when the attention is."""
import pytest
import torch

from diclip.toy.grouping_objective import grouping_loss, install_logits, same_instance_target


def test_target_rows_are_uniform_over_the_own_instance():
    inst = torch.zeros(1, 4, 4, dtype=torch.long)
    inst[0, :2, :2] = 1  # a 2x2 object in a 4x4 image, grid = pixels
    t = same_instance_target(inst, (4, 4))[0]
    assert torch.allclose(t.sum(-1), torch.ones(16))
    inside = [0, 1, 4, 5]
    assert torch.allclose(t[0, inside], torch.full((4,), 0.25)) and t[0].count_nonzero() == 4
    outside = [j for j in range(16) if j not in inside]
    assert torch.allclose(t[15, outside], torch.full((12,), 1 / 12))


def test_target_weights_tokens_by_coverage():
    inst = torch.zeros(1, 4, 4, dtype=torch.long)
    inst[0, :, :1] = 1  # a column a quarter as wide as a 2x2 grid cell: cells 0 and 2 are 50% object
    t = same_instance_target(inst, (2, 2))[0]
    # query cell 0 (half object, half background): S[0] = [0.5, 0.5, 0.5, 0.5] -> uniform
    assert torch.allclose(t[0], torch.full((4,), 0.25))
    # query cell 1 (all background): S[1] = [0.5, 1, 0.5, 1] -> weights 1/6, 1/3, 1/6, 1/3
    assert torch.allclose(t[1], torch.tensor([1 / 6, 1 / 3, 1 / 6, 1 / 3]))


def test_loss_is_zero_for_perfect_grouping_and_positive_otherwise():
    inst = torch.zeros(2, 6, 6, dtype=torch.long)
    inst[0, 1:4, 1:4] = 1
    inst[1, 2:, 3:] = 2
    target = same_instance_target(inst, (6, 6))
    perfect = target.clamp_min(1e-30).log()[:, None].expand(2, 2, 36, 36)
    assert grouping_loss(perfect, target).abs() < 1e-5
    flat = torch.zeros(2, 2, 36, 36)
    assert grouping_loss(flat, target) > 0.1
    selfish = torch.eye(36)[None, None].expand(2, 2, 36, 36) * 50  # attends to itself only: mass in, no spread
    assert grouping_loss(selfish, target) > grouping_loss(flat, target)
    # weights pick samples: sample 0 perfect, sample 1 flat
    mixed = torch.stack([perfect[0], flat[1]])
    assert grouping_loss(mixed, target, torch.tensor([1.0, 0.0])).abs() < 1e-5
    assert grouping_loss(mixed, target, torch.tensor([0.0, 1.0])) > 0.1


def test_logits_processor_matches_the_default_processor_and_keeps_gradients():
    from diclip.models.diffusion import tiny_components

    unet = tiny_components(0)["unet"]
    layer = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([101, 101])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    store: dict = {}
    before = install_logits(unet, [layer], [1, 2], store)
    out = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    logits = store[layer]
    assert logits.shape == (2, 2, 256, 256) and logits.requires_grad  # the RAR layer reads the full 16x16 latent
    logits.sum().backward()
    assert unet.get_submodule(layer).to_q.weight.grad is not None
    unet.set_attn_processor(before)


def test_logits_processor_refuses_cross_attention():
    from diclip.models.diffusion import tiny_components

    unet = tiny_components(0)["unet"]
    install_logits(unet, ["up_blocks.3.attentions.1.transformer_blocks.0.attn2"], [0], {})
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim)
    with pytest.raises(RuntimeError, match="plain self-attention"):
        unet(torch.randn(1, 4, 16, 16), torch.tensor([1]), encoder_hidden_states=ctx)
