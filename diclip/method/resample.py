"""Token-grid maps under the training augmentation (rescale, flip, pad + crop).

Correlation maps are stored once per image on a grid covering the whole image. A training crop sees
the image through a geometric transform; the map it needs is ``R' = P R P^T`` where ``P`` bilinearly
interpolates source tokens at the crop's token centres (4 taps per row, so ``P`` is applied with
gathers, never as a dense matrix). Rows are then rescaled to keep each row's interpolated mass (a
row-stochastic map stays row-stochastic; the identity transform returns the map bit-for-bit).
Tokens whose centre falls in the padding get zero rows and columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_TINY = 1e-12


@dataclass(frozen=True)
class Geometry:
    """Maps crop pixels to original-image pixels.

    The original image (``src_size`` = H0, W0) is resized to ``scaled_size``, optionally flipped
    horizontally, and the output of ``out_size`` starts at ``offset`` (y, x) in the scaled image
    (negative offsets / overhangs are padding).
    """

    src_size: tuple[int, int]
    scaled_size: tuple[int, int]
    flip: bool
    offset: tuple[int, int]
    out_size: tuple[int, int]

    @staticmethod
    def identity(size: tuple[int, int]) -> "Geometry":
        size = (int(size[0]), int(size[1]))
        return Geometry(size, size, False, (0, 0), size)

    @property
    def is_identity(self) -> bool:
        return (self.scaled_size == self.src_size and not self.flip and self.offset == (0, 0)
                and self.out_size == self.src_size)

    def to_dict(self) -> dict:
        return {"src_size": list(self.src_size), "scaled_size": list(self.scaled_size), "flip": self.flip,
                "offset": list(self.offset), "out_size": list(self.out_size)}

    @staticmethod
    def from_dict(d: dict) -> "Geometry":
        return Geometry(tuple(d["src_size"]), tuple(d["scaled_size"]), bool(d["flip"]), tuple(d["offset"]),
                        tuple(d["out_size"]))


def _axis_taps(n_dst: int, out_len: int, offset: int, scaled_len: int, src_len: int, n_src: int, flip: bool):
    """Bilinear taps along one axis: (i0, i1, w0, w1, valid) for each destination token."""
    centres = (torch.arange(n_dst, dtype=torch.float64) + 0.5) * (out_len / n_dst)  # crop continuous coords
    xs = centres + offset  # scaled-image coords
    valid = (xs >= 0) & (xs < scaled_len)
    if flip:
        xs = scaled_len - xs
    x0 = xs * (src_len / scaled_len)  # original-image coords
    coord = (x0 * (n_src / src_len) - 0.5).clamp(min=0.0)  # source token coords (align_corners=False)
    i0 = coord.floor().long().clamp(max=n_src - 1)
    frac = (coord - i0.double()).clamp(0.0, 1.0)
    i1 = (i0 + 1).clamp(max=n_src - 1)
    return i0, i1, 1.0 - frac, frac, valid


def token_taps(geom: Geometry, src_grid: tuple[int, int], dst_grid: tuple[int, int]):
    """4-tap interpolation from ``src_grid`` (whole image) to ``dst_grid`` (crop): idx, w [Nd, 4]."""
    ry0, ry1, wy0, wy1, vy = _axis_taps(dst_grid[0], geom.out_size[0], geom.offset[0], geom.scaled_size[0],
                                        geom.src_size[0], src_grid[0], False)
    rx0, rx1, wx0, wx1, vx = _axis_taps(dst_grid[1], geom.out_size[1], geom.offset[1], geom.scaled_size[1],
                                        geom.src_size[1], src_grid[1], geom.flip)
    gw = src_grid[1]
    idx = torch.stack([
        ry0[:, None] * gw + rx0[None], ry0[:, None] * gw + rx1[None],
        ry1[:, None] * gw + rx0[None], ry1[:, None] * gw + rx1[None],
    ], dim=-1).reshape(-1, 4)
    w = torch.stack([
        wy0[:, None] * wx0[None], wy0[:, None] * wx1[None],
        wy1[:, None] * wx0[None], wy1[:, None] * wx1[None],
    ], dim=-1).reshape(-1, 4)
    valid = (vy[:, None] & vx[None]).reshape(-1, 1)
    return idx, (w * valid).float()


def batch_taps(geoms: list[Geometry], src_grids: list[tuple[int, int]], dst_grid: tuple[int, int]):
    """Stacked :func:`token_taps` for a batch: idx, w [B, Nd, 4]."""
    taps = [token_taps(g, s, dst_grid) for g, s in zip(geoms, src_grids)]
    return torch.stack([t[0] for t in taps]), torch.stack([t[1] for t in taps])


def interpolation_matrix(idx: torch.Tensor, w: torch.Tensor, n_src: int) -> torch.Tensor:
    """Dense ``P`` [Nd, Ns] from taps (for tests and small grids)."""
    p = torch.zeros(idx.shape[0], n_src, dtype=w.dtype)
    p.scatter_add_(1, idx, w)
    return p


def resample_tokens(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``P x`` for token features x [B, Ns, D] -> [B, Nd, D]."""
    b, nd, _ = idx.shape
    d = x.shape[-1]
    g = x.gather(1, idx.reshape(b, nd * 4, 1).expand(-1, -1, d)).reshape(b, nd, 4, d)
    return (g * w[..., None].to(x.dtype)).sum(2)


def _rescale_rows(new: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    sums = new.contiguous().sum(-1, keepdim=True)
    scale = torch.where(sums > 0, mass[..., None] / sums.clamp_min(_TINY), torch.zeros_like(sums))
    return new * scale


def resample_map(r: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, keep_row_mass: bool = True) -> torch.Tensor:
    """``P R P^T`` for maps R [B, Ns, Ns] -> [B, Nd, Nd], rows rescaled to their interpolated mass."""
    rows = resample_tokens(r, idx, w)  # P R          [B, Nd, Ns]
    out = resample_tokens(rows.transpose(1, 2), idx, w).transpose(1, 2)  # (P R) P^T   [B, Nd, Nd]
    if not keep_row_mass:
        return out
    mass = resample_tokens(r.contiguous().sum(-1, keepdim=True), idx, w)[..., 0]  # P (R 1)
    return _rescale_rows(out, mass)


def resample_compact(ids: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``P R P^T`` for a compact ACR map (R = rows[ids]) without expanding R: [B, Nd, Nd].

    ``P R P^T = (P E)(rows P^T)`` with ``E`` the one-hot cluster membership.
    """
    k = rows.shape[1]
    onehot = torch.nn.functional.one_hot(ids.long(), k).to(rows.dtype)  # [B, Ns, K]
    pe = resample_tokens(onehot, idx, w)  # [B, Nd, K]
    rp = resample_tokens(rows.transpose(1, 2), idx, w).transpose(1, 2)  # [B, K, Nd]
    out = pe @ rp
    mass = pe @ rows.sum(-1, keepdim=True)  # P (R 1)
    return _rescale_rows(out, mass[..., 0])


def resize_grid(size: tuple[int, int], patch: int = 16, max_side: int | None = None) -> tuple[int, int]:
    """Extraction size for a whole image: multiples of ``patch``, aspect kept, longest side <= max_side."""
    h, w = size
    s = 1.0 if max_side is None else min(1.0, max_side / max(h, w))
    return max(patch, int(round(h * s / patch)) * patch), max(patch, int(round(w * s / patch)) * patch)


def grid_of(size: tuple[int, int], patch: int) -> tuple[int, int]:
    return size[0] // patch, size[1] // patch


def sqrt_grid(n: int) -> tuple[int, int]:
    s = int(round(math.sqrt(n)))
    return s, s
