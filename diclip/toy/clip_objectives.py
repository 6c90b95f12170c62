"""The toy CLIP's training objectives on one world batch: caption and class BCE on the pooled embedding, the
class token's BCE, multiple-instance learning over the (surgery) patch tokens, and the prompts' separation;
with the learnable scales and biases of each (:class:`Heads`). :mod:`diclip.toy.pretrain_clip` runs them."""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diclip.data import toy_world as world
from diclip.models.vce import VCEVisionEncoder

TEXT_WORDS = list(world.FG) + list(world.BACKGROUND_WORDS)


def targets_for(labels: np.ndarray, backgrounds: list[str]) -> torch.Tensor:
    """[B, len(TEXT_WORDS)]: class labels, then one column per background word."""
    cols = [torch.from_numpy(labels)]
    for w in world.BACKGROUND_WORDS:  # "background" is in every image; otherwise the background kind
        cols.append(torch.tensor([[float(w == "background" or b == w)] for b in backgrounds]))
    return torch.cat(cols, 1)


def surgery_forward(visual, pixels: torch.Tensor, surgery_blocks: int):
    """Differentiable twin of ``VCEVisionEncoder.forward`` (no correlation map).

    Returns (surgery-path projected tokens [B,1+N,C], original-path projected tokens [B,1+N,C]);
    ``surgery_blocks=0`` gives the plain ViT for both.
    """
    enc = VCEVisionEncoder.__new__(VCEVisionEncoder)  # borrow its methods without freezing `visual`
    nn.Module.__init__(enc)
    object.__setattr__(enc, "visual", visual)
    p = visual.patch_size
    enc.patch = int(p[0] if isinstance(p, (tuple, list)) else p)
    enc._pos_cache = {}
    x, grid = enc.embed(pixels)
    blocks = visual.transformer.resblocks
    first = len(blocks) - surgery_blocks
    x_new = None
    for i, blk in enumerate(blocks):
        if i < first:
            y = blk.ln_1(x)
            x = x + blk.ls_1(blk.attn(y, y, y, need_weights=False)[0])
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        else:
            res_new, res_ori, _ = enc._surgery_attention(blk, blk.ln_1(x), None)
            x_new = (x if x_new is None else x_new) + blk.ls_1(res_new)
            x = x + blk.ls_1(res_ori)
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    sur = x if x_new is None else torch.cat([x[:, :1], x_new[:, 1:]], dim=1)
    outs = []
    for t in (sur, x):
        t = visual.ln_post(t)
        outs.append(t @ visual.proj if visual.proj is not None else t)
    return outs[0], outs[1]


def token_norm(feats: torch.Tensor) -> torch.Tensor:
    """The pipeline's normalisation (over the token axis, dim=1), rescaled so entries are O(1/sqrt(C))."""
    n = feats.shape[1]
    return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-6) * math.sqrt(n)


def topk_pool(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N, T] -> [B, T]: mean of the k largest token logits per text."""
    k = min(k, logits.shape[1])
    return logits.topk(k, dim=1).values.mean(1)


class Heads(nn.Module):
    """Learnable logit scales/biases of the three sigmoid losses (training only)."""

    def __init__(self, n_text: int):
        super().__init__()
        self.cap = nn.Parameter(torch.tensor([math.log(10.0), -5.0]))
        self.cls = nn.Parameter(torch.tensor([math.log(10.0), -2.0]))
        self.mil_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.mil_bias = nn.Parameter(torch.full((n_text,), -2.0))


def step_losses(model, heads: Heads, tokenizer, word_tokens: torch.Tensor, b: dict, args, mean, std
                ) -> dict[str, torch.Tensor]:
    """The enabled objectives on one world batch ``b`` (caption and class BCE on the pooled embedding, the
    class token's BCE, MIL over patch tokens, the prompts' separation), unweighted."""
    pix = world.to_tensor(b["images"], mean, std)
    tgt = targets_for(b["labels"], b["backgrounds"])
    # unique captions; positives share the image's class set
    caps = sorted(set(b["captions"]))
    cap_sets = [frozenset(n for n in world.FG if n in re.findall(r"[a-z]+", c)) for c in caps]
    img_sets = [frozenset(world.FG[j] for j in np.nonzero(l)[0]) for l in b["labels"]]
    cap_tgt = torch.tensor([[float(s == c) for c in cap_sets] for s in img_sets])
    text = model.encode_text(torch.cat([word_tokens, tokenizer(caps)]))
    text = F.normalize(text, dim=-1)
    wtext, ctext = text[: len(TEXT_WORDS)], text[len(TEXT_WORDS):]
    losses = {}
    need_tokens = args.w_mil > 0 or args.w_cls_token > 0
    if need_tokens:
        sur, ori = surgery_forward(model.visual, pix, args.surgery_blocks if args.mil_path == "surgery" else 0)
        if args.mil_path == "standard":
            sur = ori
        v = model.visual
        if v.pool_type == "avg":
            pooled = ori[:, 1:].mean(1) if v.final_ln_after_pool is False else None
        else:
            pooled = ori[:, 0]
    else:
        sur = None
        pooled = model.encode_image(pix)
    pooled = F.normalize(pooled, dim=-1)
    if args.w_caption > 0:
        lg = pooled @ ctext.t() * heads.cap[0].exp() + heads.cap[1]
        losses["caption"] = F.binary_cross_entropy_with_logits(lg, cap_tgt)
    if args.w_cls > 0:
        lg = pooled @ wtext.t() * heads.cls[0].exp() + heads.cls[1]
        losses["cls"] = F.binary_cross_entropy_with_logits(lg, tgt)
    if args.w_cls_token > 0:
        lg = F.normalize(ori[:, 0], dim=-1) @ wtext.t() * heads.cls[0].exp() + heads.cls[1]
        losses["cls_token"] = F.binary_cross_entropy_with_logits(lg, tgt)
    if args.w_mil > 0:
        f = token_norm(sur) if args.mil_norm == "token" else F.normalize(sur, dim=-1)
        tok = f[:, 1:] @ wtext.t() * heads.mil_scale.exp() + heads.mil_bias  # [B, N, T]
        lg = topk_pool(tok, args.mil_k)
        losses["mil"] = F.binary_cross_entropy_with_logits(lg, tgt)
    if args.w_text_sep > 0:
        # "a photo of X." differ by one token: at init their embeddings have cosine ~0.95, and the
        # towers sit at a symmetric saddle (no class structure on either side for the other to
        # align to; the v1 world needed a colour curriculum to leave it). Pushing the prompts apart
        # gives the image side distinct targets from the first steps.
        cos = wtext @ wtext.t()
        off = cos[~torch.eye(len(TEXT_WORDS), dtype=torch.bool)]
        losses["text_sep"] = off.clamp_min(0).pow(2).mean()
    return losses
