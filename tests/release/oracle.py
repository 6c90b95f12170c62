"""Independent restatement of the reference's segmentation inference on a released state dict.

Imports nothing from ``diclip``; reuses the CLIP encoder of ``tests/oracle/reference.py``
(``encode_image``/``model_forward``, the aliased per-layer features included) and adds what that oracle
takes from its caller, read from the reference's files:

* loading (tools/infer_seg_voc.py): strip ``module.``, drop ``encoder.visual.positional_embedding``,
  ``load_state_dict(strict=False)`` into a freshly built ``DiCLIP_model``: so the positional table is the
  one of the CLIP the model was built with (``clip_positional``), every other tensor the checkpoint's;
* the surgery ``Attention`` of the last blocks (clip_custom.py) computes q, k, v with its ``qkv`` Linear and
  projects with ``proj``: the encoder oracle reads them as ``in_proj``/``out_proj`` (same math);
* ``SegFormerHead.forward`` (ExCEL model/segformer_head.py): per layer ``MLP`` (flatten, proj, ReLU, proj_2),
  concatenated, ``linear_fuse`` 1x1 conv, Dropout2d (identity in eval);
* ``DecoderTransformer.forward`` (ExCEL model/decoder/TransDecoder.py): tokens [HW, B, E] through
  pre-LN residual blocks (``myAtt.MultiheadAttention``, WeCLIP's copy of torch's: packed in_proj, q scaled
  by d^-1/2 before q k^T, softmax, out_proj; MLP c_fc -> QuickGELU -> c_proj), then ``linear_pred``.
* ``DiCLIP_model.forward(eval_seg=True)``: no diffusion map, returns ``seg`` only.

Generalisations: the number of vision heads is an argument (OpenAI: width // 64); LayerNorm eps 1e-5.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import torch
import torch.nn.functional as F

from tests.oracle import reference

EPS = 1e-5


def _ln(state: dict, prefix: str) -> NS:
    w = state[prefix + ".weight"]
    return NS(weight=w, bias=state[prefix + ".bias"], normalized_shape=tuple(w.shape), eps=EPS)


def _lin(state: dict, prefix: str) -> NS:
    return NS(weight=state[prefix + ".weight"], bias=state[prefix + ".bias"])


def strip_module(state: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def visual_from_state(state: dict, clip_positional: torch.Tensor, heads: int) -> NS:
    """The objects ``reference.encode_image`` reads, from ``encoder.visual.*`` of a checkpoint."""
    v = "encoder.visual."
    w = state[v + "conv1.weight"]
    blocks = []
    i = 0
    while f"{v}transformer.resblocks.{i}.ln_1.weight" in state:
        b = f"{v}transformer.resblocks.{i}."
        if b + "attn.qkv.weight" in state:  # surgery Attention: qkv / proj Linears
            attn = NS(in_proj_weight=state[b + "attn.qkv.weight"], in_proj_bias=state[b + "attn.qkv.bias"],
                      out_proj=_lin(state, b + "attn.proj"), num_heads=heads)
        else:
            attn = NS(in_proj_weight=state[b + "attn.in_proj_weight"], in_proj_bias=state[b + "attn.in_proj_bias"],
                      out_proj=_lin(state, b + "attn.out_proj"), num_heads=heads)
        blocks.append(NS(attn=attn, ln_1=_ln(state, b + "ln_1"), ln_2=_ln(state, b + "ln_2"),
                         mlp=NS(c_fc=_lin(state, b + "mlp.c_fc"), c_proj=_lin(state, b + "mlp.c_proj"))))
        i += 1
    return NS(conv1=NS(weight=w, bias=None, stride=(w.shape[-2], w.shape[-1]), padding=(0, 0)),
              class_embedding=state[v + "class_embedding"], positional_embedding=clip_positional,
              ln_pre=_ln(state, v + "ln_pre"), ln_post=_ln(state, v + "ln_post"), proj=state[v + "proj"],
              transformer=NS(resblocks=blocks))


def segformer_head(state: dict, x_all: torch.Tensor) -> torch.Tensor:
    """x_all [L, B, W, h, w] -> fused features [B, E, h, w]."""
    maps = []
    for ind in range(x_all.shape[0]):
        x = x_all[ind].float()
        n, _, h, w = x.shape
        p = f"decoder_fts_fuse.linears_modulelist.{ind}."
        t = x.flatten(2).transpose(1, 2)
        t = F.linear(F.relu(F.linear(t, state[p + "proj.weight"], state[p + "proj.bias"])),
                     state[p + "proj_2.weight"], state[p + "proj_2.bias"])
        maps.append(t.permute(0, 2, 1).reshape(n, -1, h, w))
    return F.conv2d(torch.cat(maps, dim=1), state["decoder_fts_fuse.linear_fuse.weight"],
                    state["decoder_fts_fuse.linear_fuse.bias"])


def _mha(state: dict, p: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Self-attention of torch's MultiheadAttention on x [L, N, E] (batch second)."""
    l, n, e = x.shape
    d = e // heads
    q, k, v = F.linear(x, state[p + "in_proj_weight"], state[p + "in_proj_bias"]).chunk(3, dim=-1)

    def split(t):  # [L, N, E] -> [N*H, L, d]
        return t.reshape(l, n * heads, d).transpose(0, 1)

    q, k, v = split(q) * d ** -0.5, split(k), split(v)
    out = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    out = out.transpose(0, 1).reshape(l, n, e)
    return F.linear(out, state[p + "out_proj.weight"], state[p + "out_proj.bias"])


def decoder_transformer(state: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """fused features [B, E, h, w] -> logits [B, K, h, w]."""
    b, c, h, w = x.shape
    t = x.reshape(b, c, h * w).permute(2, 0, 1)
    i = 0
    while f"decoder.transformer.resblocks.{i}.ln_1.weight" in state:
        p = f"decoder.transformer.resblocks.{i}."
        t = t + _mha(state, p + "attn.", reference._layer_norm(_ln(state, p + "ln_1"), t), heads)
        y = reference._layer_norm(_ln(state, p + "ln_2"), t)
        y = F.linear(reference._quick_gelu(F.linear(y, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])),
                     state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        t = t + y
        i += 1
    t = t.permute(1, 2, 0).reshape(b, c, h, w)
    return F.conv2d(t, state["decoder.linear_pred.weight"], state["decoder.linear_pred.bias"])


@torch.no_grad()
def eval_seg(checkpoint: dict, clip_positional: torch.Tensor, pixels: torch.Tensor, *, vision_heads: int,
             decoder_heads: int) -> torch.Tensor:
    """``DiCLIP_model(pixels, eval_seg=True)`` after the reference's checkpoint loading; pixels normalised."""
    state = {k: v.float() for k, v in strip_module(checkpoint).items()}
    visual = visual_from_state(state, clip_positional, vision_heads)
    surgery = sum(1 for k in state if k.startswith("encoder.visual.transformer.") and k.endswith("attn.qkv.weight"))
    assert surgery == 3, "reload_self_attn(layers=4) makes the last 3 blocks surgery blocks"
    num_classes = state["decoder.linear_pred.weight"].shape[0]

    def fuse(tokens):
        return segformer_head(state, tokens)

    def decode(fts):
        return decoder_transformer(state, fts, decoder_heads)

    out = reference.model_forward(visual, None, None, None, None, fuse, decode, pixels, None,
                                  num_classes=num_classes, return_dynamic=False, eval_seg=True)
    return out["seg"]
