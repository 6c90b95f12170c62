"""Teach the toy diffusion model's read heads to group objects: a toy-only training objective.

Why: DiCLIP's diffusion parts rest on Stable Diffusion's self-attention grouping the pixels of one
object, knowledge SD gathers from billions of images. A 5 MB UNet trained for an hour on the toy world
with the epsilon loss alone does not get there (``docs/quality.md``: its VCE and RAR maps put *less*
mass in the object than chance), so the toy world could not show what VCE and RAR are for. This
objective stands in for that knowledge: while the UNet keeps training on the epsilon loss, the heads
the method reads (``model.diffusion.heads`` of the VCE and RAR layers) are also pulled towards
attending uniformly over the query token's own object instance (background counts as one region).

It uses instance masks of the *pretraining* images (toy-world indices from 0; the ``synthesize``
stage's train/val images come from 20,000,000 on), the way SD's objectness comes from its own
pretraining data: the WSSS pipeline itself still sees only image-level labels. The other heads and
layers are left to the epsilon loss alone, and the objective is applied only at the low noise levels
the method reads at (``t < tmax``).

Definitions, for one layer with a token grid ``(h, w)`` and instance coverage ``C[k, j]`` (the share
of token ``j``'s pixels in instance ``k``, ``attention_grouping.token_coverage``):

* same-instance affinity ``S[i, j] = sum_k C[k, i] C[k, j]`` (the chance that a pixel of token i and
  one of token j lie in the same instance);
* target row ``T[i] = S[i] / sum_j S[i, j]``: uniform over the query's own instance;
* loss: the cross-entropy ``-sum_j T[i, j] log softmax(q_i k_j^T * scale)`` averaged over queries and
  read heads, minus its minimum (the target's entropy), so 0 = perfect grouping. A cross-entropy
  rather than "mass inside the object" because mass alone is maximised by a token attending to itself.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from diclip.method.attention_grouping import token_coverage


class LogitsProcessor:
    """Self-attention processor that keeps the pre-softmax logits of ``heads`` (with gradient) in
    ``store[name]`` and otherwise computes exactly what diffusers' default processor does."""

    def __init__(self, store: dict, name: str, heads: Sequence[int]):
        self.store, self.name, self.heads = store, name, list(heads)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(f"{self.name}: LogitsProcessor expects a plain self-attention layer")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = (f(hidden_states).view(batch, length, heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        self.store[self.name] = (q[:, self.heads] @ k[:, self.heads].transpose(-1, -2)) * attn.scale
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, length, -1)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_logits(unet, layers: Sequence[str], heads: Sequence[int], store: dict) -> dict:
    """Put :class:`LogitsProcessor` on ``layers``; returns the processors it replaced (to restore)."""
    before = dict(unet.attn_processors)
    procs = dict(before)
    for layer in layers:
        procs[f"{layer}.processor"] = LogitsProcessor(store, layer, heads)
    unet.set_attn_processor(procs)
    return before


def same_instance_target(instances: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Instance maps [B, H, W] (0 = background) -> target rows [B, M, M], each uniform over the query
    token's own instance (weighted by coverage)."""
    covs = [token_coverage(inst, grid) for inst in instances]
    k = max(c.shape[0] for c in covs)
    cov = torch.stack([F.pad(c, (0, 0, 0, k - c.shape[0])) for c in covs])  # [B, K, M]
    same = cov.transpose(1, 2) @ cov  # [B, M, M]
    return same / same.sum(-1, keepdim=True).clamp_min(1e-12)


def grouping_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of softmax(``logits``) [B, h, M, M] against ``target`` [B, M, M], less the target's
    entropy (0 = attention uniform over the own instance), averaged over heads and queries, then over
    samples with ``weights`` [B] (e.g. 1 for samples at the read noise levels, 0 elsewhere)."""
    logp = logits.float().log_softmax(-1)
    t = target[:, None].to(logp.dtype)
    ce = -(t * logp).sum(-1)  # [B, h, M]
    entropy = -(t * t.clamp_min(1e-12).log()).sum(-1)
    per_sample = (ce - entropy).mean((1, 2))
    if weights is None:
        return per_sample.mean()
    w = weights.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0)
