"""CLIP's vision transformer with VCE: dual-path (surgery) attention plus the diffusion correlation.

Runs the blocks of an open_clip ``VisionTransformer`` itself (reusing its weights, not patching its
code). The first ``L - surgery_blocks`` blocks are standard and report head-averaged attention. The
last ``surgery_blocks`` blocks run two paths from the same input:

* original: ``softmax(q k^T s)`` + MLP, as CLIP; it carries the CLS token and feeds the next block;
* surgery:  ``softmax(q q^T s) + 2 softmax(k k^T s)`` per head, plus the correlation map ``R`` on the
  patch-patch block of every head, summed over heads; no MLP; accumulated residually.

Patch features for the CAMs are the surgery path's final tokens (CLS from the original path) after
``ln_post`` and the projection. Without a correlation map this is CLIP Surgery.

**Segmenter inputs** (``layer_tokens``). The reference collects one token tensor per block into a list
and then updates some of those tensors in place (``x += ...`` on the surgery path, ``x_ori += ...``
on the original path, ``x[0] = x_ori[0]``) before stacking them. So with ``features="reference"``
(what the published models were trained on), for ``s`` surgery blocks starting at block ``f``:

* entry ``f-1`` holds the final surgery path (with the diffusion bias when a map is given; CLS from
  the original path), not the output of block ``f-1``;
* entries ``f .. L-2`` hold the original path *before* the next block's MLP (after its attention);
* entry ``L-1`` and the entries before ``f-1`` are the clean block outputs.

``features="clean"`` gives every block's own output (original path for surgery blocks). Because the
reference always runs the surgery blocks, segmentation-only inference in ``reference`` mode still
computes the surgery path (without a diffusion map); ``clean`` mode can skip it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VisionOutput:
    features: torch.Tensor
    """[B, 1+N, C] projected tokens (surgery path, CLS from the original path), not normalised."""
    layer_tokens: torch.Tensor
    """[L, B, 1+N, W] per-block tokens, the segmenter's input (see the module doc: reference or clean)."""
    attn: torch.Tensor
    """[B, L, 1+N, 1+N] attention per block: head mean (standard blocks), head sum of the original
    path (surgery blocks) - the reference's mix, used for CLIP affinity."""
    grid: tuple[int, int]


class VCEVisionEncoder(nn.Module):
    """Frozen CLIP vision tower with VCE. ``forward(pixels, corr)``; pixels already normalised."""

    def __init__(self, visual: nn.Module, surgery_blocks: int = 3, features: str = "reference"):
        super().__init__()
        if features not in ("reference", "clean"):
            raise ValueError(f"segmenter features must be reference|clean, got {features!r}")
        self.features = features
        self.visual = visual
        blocks = visual.transformer.resblocks
        if not 1 <= surgery_blocks <= len(blocks):
            raise ValueError(f"surgery_blocks={surgery_blocks} but the ViT has {len(blocks)} blocks")
        for blk in blocks:
            if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
                raise TypeError("VCE needs open_clip ViT blocks built on nn.MultiheadAttention")
        self.surgery_blocks = surgery_blocks
        p = visual.patch_size
        self.patch = int(p[0] if isinstance(p, (tuple, list)) else p)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "VCEVisionEncoder":  # frozen: always eval (no dropout)
        return super().train(False)

    # ------------------------------------------------------------------------------------------
    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """Positional embedding bilinearly resized from the pretrained grid to gh x gw (cached)."""
        key = (gh, gw)
        pos = self.visual.positional_embedding
        if key not in self._pos_cache or self._pos_cache[key].device != pos.device:
            n0 = pos.shape[0] - 1
            side = int(round(n0 ** 0.5))
            if (side, side) == key:
                out = pos
            else:
                grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
                grid = F.interpolate(grid.float(), size=key, mode="bilinear", align_corners=False)
                out = torch.cat([pos[:1].float(), grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)], 0).to(pos.dtype)
            self._pos_cache[key] = out
        return self._pos_cache[key]

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        v = self.visual
        h, w = pixels.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch}")
        x = v.conv1(pixels.to(v.conv1.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype)[None, None].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(gh, gw).to(x.dtype)
        return v.ln_pre(x), (gh, gw)

    @staticmethod
    def _qkv(attn: nn.MultiheadAttention, x: torch.Tensor):
        b, n, c = x.shape
        h = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # [B, H, N, D]

    @staticmethod
    def _mlp(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``blk.mlp(x)``; open_clip's QuickGELU MLP runs with its activation in place (the same values as
        ``h * sigmoid(1.702 * h)``, without two [B, N, 4W] temporaries). Only under no_grad."""
        from open_clip.transformer import QuickGELU

        mlp = blk.mlp
        if (not torch.is_grad_enabled() and isinstance(mlp, nn.Sequential) and len(mlp) == 3
                and type(getattr(mlp, "gelu", None)) is QuickGELU and isinstance(mlp.c_fc, nn.Linear)
                and isinstance(mlp.c_proj, nn.Linear)):
            h = mlp.c_fc(x)
            h.mul_(h.mul(1.702).sigmoid_())
            return mlp.c_proj(h)
        return mlp(x)

    def _standard_block(self, blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = blk.ln_1(x)
        out, weights = blk.attn(y, y, y, need_weights=True, average_attn_weights=True)
        x = x + blk.ls_1(out)
        x = x + blk.ls_2(self._mlp(blk, blk.ln_2(x)))
        return x, weights

    def _surgery_attention(self, blk: nn.Module, y: torch.Tensor, corr: torch.Tensor | None):
        attn = blk.attn
        b, n, c = y.shape
        q, k, v = self._qkv(attn, y)
        s = (c // attn.num_heads) ** -0.5
        if torch.is_grad_enabled():  # training CLIP itself (the toy pretraining): autograd needs the originals
            ori = (q @ k.transpose(-1, -2) * s).softmax(-1)
            sur = (q @ q.transpose(-1, -2) * s).softmax(-1) + 2 * (k @ k.transpose(-1, -2) * s).softmax(-1)
            if corr is not None:
                sur = sur.clone()
                sur[:, :, 1:, 1:] = sur[:, :, 1:, 1:] + corr[:, None].to(sur.dtype)
        else:
            # the [B, H, N, N] temporaries updated in place: the same values as above, less memory traffic
            ori = (q @ k.transpose(-1, -2)).mul_(s).softmax(-1)
            sur = (q @ q.transpose(-1, -2)).mul_(s).softmax(-1)
            sur.add_((k @ k.transpose(-1, -2)).mul_(s).softmax(-1).mul_(2))
            if corr is not None:
                sur[:, :, 1:, 1:] += corr[:, None].to(sur.dtype)
        sur = sur.sum(1)  # one map for all heads
        x_ori = (ori @ v).transpose(1, 2).reshape(b, n, c)
        # the shared map times every head's values at once: v as [B, N, H*D] is a view of the qkv projection
        x_new = sur @ v.transpose(1, 2).reshape(b, n, c)
        proj = attn.out_proj
        return F.linear(x_new, proj.weight, proj.bias), F.linear(x_ori, proj.weight, proj.bias), ori.sum(1)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, corr: torch.Tensor | None = None, surgery: bool = True) -> VisionOutput:
        """``surgery=False`` asks only for what segmentation needs: in ``clean`` mode the surgery path
        is skipped (``features`` are then the original path's); in ``reference`` mode it still runs,
        without a diffusion map, because the segmenter's inputs depend on it."""
        x, grid = self.embed(pixels)
        n = grid[0] * grid[1]
        if corr is not None and corr.shape[-2:] != (n, n):
            raise ValueError(f"correlation map is {tuple(corr.shape[-2:])} but the image has {n} tokens ({grid})")
        reference = self.features == "reference"
        if not surgery:
            corr = None
        run_surgery = surgery or reference
        blocks = self.visual.transformer.resblocks
        first_surgery = len(blocks) - self.surgery_blocks
        tokens, attns = [], []
        x_new = None
        for i, blk in enumerate(blocks):
            if i < first_surgery or not run_surgery:
                x, w = self._standard_block(blk, x)
            else:
                res_new, res_ori, w = self._surgery_attention(blk, blk.ln_1(x), corr)
                x_new = (x if x_new is None else x_new) + blk.ls_1(res_new)
                x = x + blk.ls_1(res_ori)
                if reference and i > first_surgery:
                    tokens[-1] = x  # the previous entry, updated in place before this block's MLP
                x = x + blk.ls_2(self._mlp(blk, blk.ln_2(x)))
            tokens.append(x)
            attns.append(w)
        out = x if x_new is None else torch.cat([x[:, :1], x_new[:, 1:]], dim=1)
        if reference and x_new is not None and first_surgery >= 1:
            tokens[first_surgery - 1] = out  # the entry the surgery path accumulated into
        v = self.visual
        out = v.ln_post(out)
        if v.proj is not None:
            out = out @ v.proj
        return VisionOutput(features=out, layer_tokens=torch.stack(tokens), attn=torch.stack(attns, 1), grid=grid)
