"""PAR: pixel-adaptive refinement of CAMs with local colour and position affinities (ToCo).

The reference builds ``PAR(num_iter=20, dilations=[1, 2, 4, 8, 12, 24])`` for validation. Each pixel
looks at its 8 neighbours at every dilation; affinities are a softmax over neighbours of
``-(|I_p - I_n| / (std_n * 0.3))^2`` (averaged over colour channels) plus ``0.01 *`` a softmax of the
same form over the neighbour distances; the CAM is then averaged over neighbours ``num_iter`` times.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# 3x3 kernels that pick each of the 8 neighbours (row-major, centre skipped).
_OFFSETS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]


def _neighbour_kernel() -> torch.Tensor:
    k = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate(_OFFSETS):
        k[i, 0, r, c] = 1.0
    return k


class PAR(nn.Module):
    def __init__(self, dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24), num_iter: int = 20,
                 w_color: float = 0.3, w_pos: float = 0.01):
        super().__init__()
        self.dilations = tuple(dilations)
        self.num_iter = num_iter
        self.w_color = w_color
        self.w_pos = w_pos
        self.register_buffer("kernel", _neighbour_kernel(), persistent=False)
        dist = torch.tensor([math.sqrt(2) if (r != 1 and c != 1) else 1.0 for r, c in _OFFSETS])
        self.register_buffer("pos", torch.cat([dist * d for d in self.dilations]).reshape(1, 1, -1, 1, 1),
                             persistent=False)

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, 8 * len(dilations), H, W] (replicate padding at borders)."""
        b, c, h, w = x.shape
        out = []
        for d in self.dilations:
            padded = F.pad(x, [d, d, d, d], mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(padded, self.kernel.to(x.dtype), dilation=d).reshape(b, c, 8, h, w))
        return torch.cat(out, dim=2)

    def affinity(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        nb = self.neighbours(images)
        diff = (nb - images[:, :, None]).abs()
        std = nb.std(dim=2, keepdim=True)
        aff = -((diff / (std + 1e-8) / self.w_color) ** 2)
        aff = aff.mean(dim=1, keepdim=True)
        pos = self.pos.to(images.dtype).expand(b, 1, -1, h, w)
        pos_aff = -((pos / (pos.std(dim=2, keepdim=True) + 1e-8) / self.w_color) ** 2)
        return aff.softmax(dim=2) + self.w_pos * pos_aff.softmax(dim=2)

    def forward(self, images: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (any scale), cams [B, K, h, w] -> refined cams [B, K, H, W]."""
        cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=True)
        aff = self.affinity(images.float())
        for _ in range(self.num_iter):
            cams = (self.neighbours(cams) * aff).sum(2)
        return cams
