"""Compact forms of the RAR attention map (softmax self-attention of the high-resolution UNet layer).

The dense map is M x M (1600 x 1600 at 320 px; 4096 x 4096 for a 512 px image): 5-33 MB in fp16 per
image, too much to store for a dataset. Codecs (registry ``RAR_CODECS``; chosen by measurement in
``bench/correlation_storage.py``):

* ``qk_fp16`` - the layer's per-head q and k for the used heads in fp16; the map is recomputed as
  ``softmax(q k^T * scale)`` (~0.3 GFLOP). Exact for an fp16 UNet (what a GPU run computes), and a
  crop is handled by resampling q and k and re-softmaxing over the crop's tokens.
* ``qk_int8`` - the same with per-token symmetric int8 q and k (+ fp16 scales): half the bytes.
* ``topk`` - the k largest entries of each row of the head-mean map (fp16 values, int16 columns).
* ``dense_fp16`` - the head-mean map itself (the baseline for measurements).

Every codec turns a :class:`~diclip.models.attention_capture.CapturedAttention`-like (q, k, scale) into
a dict of numpy arrays for one image (``encode``), and back into a head-mean map for a batch, either
on the stored grid or on a crop's grid through taps from :mod:`diclip.method.resample` (``decode``).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from diclip.method.resample import resample_map, resample_tokens


def _attn_mean(q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head mean of softmax(q k^T * scale): q, k [B, h, M, d] -> [B, M, M]; masked keys get 0.

    ``key_mask`` [B, M] also zeroes the rows of masked (padding) queries.

    Computed one image at a time with in-place updates: at full size a [B, h, M, M] temporary is
    80 MB, which the allocator maps fresh (page faults) on every call, while the per-image [h, M, M]
    ones are reused. The row mask is applied after the head mean (multiplying by 0/1 commutes with
    the mean exactly) and an all-valid mask is skipped, so the values are those of the plain batched
    form ``softmax(q k^T * scale)`` masked, ``nan_to_num``, masked rows, ``mean(1)``."""
    q, k = q.float(), k.float()
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    out = torch.empty(q.shape[0], q.shape[2], k.shape[2], dtype=torch.float32, device=q.device)
    for i in range(q.shape[0]):
        logits = (q[i] @ k[i].transpose(-1, -2)).mul_(scale)  # [h, M, M]
        if key_mask is not None:
            logits.masked_fill_(~key_mask[i, None, None, :], float("-inf"))
        torch.mean(logits.softmax(-1), 0, out=out[i])
        del logits
    if key_mask is not None:
        # rows are NaN only in an image with no valid key at all, and all its rows are masked to 0
        out = torch.nan_to_num_(out, nan=0.0).mul_(key_mask[:, :, None])
    return out


class RarCodec(Protocol):
    name: str

    def encode(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        """One image: q, k [h, M, d] -> arrays to store."""

    def decode(self, items: list[dict[str, np.ndarray]], taps=None) -> torch.Tensor:
        """Batch of stored items -> head-mean maps [B, M', M'] (M' = crop grid when ``taps`` given)."""


class QKCodec:
    """q and k of the used heads, fp16 (``bits=16``) or per-token int8 (``bits=8``)."""

    def __init__(self, bits: int = 16):
        self.bits = bits
        self.name = "qk_fp16" if bits == 16 else "qk_int8"

    def encode(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict[str, np.ndarray]:
        out = {"scale": np.asarray([scale], dtype=np.float32)}
        for name, t in (("q", q), ("k", k)):
            t = t.float().cpu()
            if self.bits == 16:
                out[name] = t.half().numpy()
            else:
                s = t.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
                out[name] = torch.round(t / s).clamp(-127, 127).to(torch.int8).numpy()
                out[name + "_s"] = s.half().numpy()
        return out

    def tensors(self, item: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, float]:
        q = torch.from_numpy(np.asarray(item["q"])).float()
        k = torch.from_numpy(np.asarray(item["k"])).float()
        if self.bits == 8:
            q = q * torch.from_numpy(np.asarray(item["q_s"])).float()
            k = k * torch.from_numpy(np.asarray(item["k_s"])).float()
        return q, k, float(np.asarray(item["scale"]).reshape(-1)[0])

    def decode(self, items, taps=None) -> torch.Tensor:
        qs, ks, scales = zip(*(self.tensors(it) for it in items))
        scale = scales[0]
        if taps is None:
            return _attn_mean(torch.stack(qs), torch.stack(ks), scale)
        idx, w = taps
        b, nd, _ = idx.shape
        h = qs[0].shape[0]
        # Resample per-head tokens to the crop grid; tokens in the padding are excluded as keys.
        q = torch.stack([resample_tokens(x, idx[i:i + 1].expand(h, -1, -1), w[i:i + 1].expand(h, -1, -1))
                         for i, x in enumerate(qs)])
        k = torch.stack([resample_tokens(x, idx[i:i + 1].expand(h, -1, -1), w[i:i + 1].expand(h, -1, -1))
                         for i, x in enumerate(ks)])
        valid = w.sum(-1) > 0
        return _attn_mean(q, k, scale, key_mask=valid)


class TopKCodec:
    """k largest entries per row of the head-mean map."""

    def __init__(self, k: int = 64):
        self.k = k
        self.name = f"topk{k}"

    def encode(self, q, k, scale) -> dict[str, np.ndarray]:
        dense = _attn_mean(q[None], k[None], scale)[0]
        vals, cols = dense.topk(min(self.k, dense.shape[-1]), dim=-1)
        return {"values": vals.half().numpy(), "cols": cols.to(torch.int16).numpy(), "n": np.asarray([dense.shape[-1]])}

    def dense(self, item) -> torch.Tensor:
        n = int(np.asarray(item["n"]).reshape(-1)[0])
        vals = torch.from_numpy(np.asarray(item["values"])).float()
        cols = torch.from_numpy(np.asarray(item["cols"]).astype(np.int64))
        out = torch.zeros(vals.shape[0], n)
        out.scatter_(1, cols, vals)
        return out

    def decode(self, items, taps=None) -> torch.Tensor:
        maps = torch.stack([self.dense(it) for it in items])
        return maps if taps is None else resample_map(maps, *taps)


class DenseCodec:
    """The head-mean map in fp16 (baseline)."""

    name = "dense_fp16"

    def encode(self, q, k, scale) -> dict[str, np.ndarray]:
        return {"map": _attn_mean(q[None], k[None], scale)[0].half().numpy()}

    def decode(self, items, taps=None) -> torch.Tensor:
        maps = torch.stack([torch.from_numpy(np.asarray(it["map"])).float() for it in items])
        return maps if taps is None else resample_map(maps, *taps)


RAR_CODECS = {
    "qk_fp16": lambda: QKCodec(16),
    "qk_int8": lambda: QKCodec(8),
    "topk64": lambda: TopKCodec(64),
    "topk32": lambda: TopKCodec(32),
    "dense_fp16": lambda: DenseCodec(),
}


def get_codec(name: str) -> RarCodec:
    if name not in RAR_CODECS:
        raise ValueError(f"unknown RAR codec {name!r}; known: {', '.join(RAR_CODECS)}")
    return RAR_CODECS[name]()


def nbytes(item: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in item.values()))
