"""Segmentation head on CLIP's per-layer patch tokens (WeCLIP/ExCEL design, as DiCLIP uses it).

``LayerFusion`` (SegFormer-style): one MLP per CLIP layer (Linear -> ReLU -> Linear) to
``embedding_dim``, concatenated, fused by a 1x1 conv, Dropout2d. ``TransformerDecoder``: pre-LN
residual attention blocks (QuickGELU MLP 4x, no positional embedding) and a 1x1 conv to class logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class TokenMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.proj_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(torch.relu(self.proj(x)))


class LayerFusion(nn.Module):
    def __init__(self, in_channels: int, embedding_dim: int, num_layers: int, dropout: float = 0.1):
        super().__init__()
        self.mlps = nn.ModuleList(TokenMLP(in_channels, embedding_dim) for _ in range(num_layers))
        self.fuse = nn.Conv2d(embedding_dim * num_layers, embedding_dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens [L, B, N, W] (patch tokens, no CLS) -> fused features [B, E, h, w]."""
        if tokens.shape[0] != len(self.mlps):
            raise ValueError(f"expected tokens of {len(self.mlps)} layers, got {tokens.shape[0]}")
        b, n = tokens.shape[1:3]
        maps = [mlp(t).transpose(1, 2).reshape(b, -1, grid[0], grid[1]) for mlp, t in zip(self.mlps, tokens)]
        return self.dropout(self.fuse(torch.cat(maps, dim=1)))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TransformerDecoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, num_classes: int):
        super().__init__()
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(layers))
        self.head = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        x = feats.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.transpose(1, 2).reshape(b, c, h, w))


class Segmenter(nn.Module):
    def __init__(self, in_channels: int, num_layers: int, num_classes: int, embedding_dim: int = 256,
                 layers: int = 3, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.fusion = LayerFusion(in_channels, embedding_dim, num_layers, dropout)
        self.decoder = TransformerDecoder(embedding_dim, layers, heads, num_classes)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [B, K, h, w], fused features [B, E, h, w])."""
        fused = self.fusion(tokens, grid)
        return self.decoder(fused), fused
