"""From a captured diffusion pass to the two maps the method uses (shared by ``correlate`` and online mode).

* VCE map: ACR-refined ``q k^T`` chain of the configured heads on the CLIP grid (compact form).
* RAR map: head-mean softmax attention of the high-resolution layer (dense here; the ``correlate``
  stage stores it through a codec from q and k instead).
"""
from __future__ import annotations

import zlib

import torch

from diclip.config import DiffusionConfig, MethodConfig
from diclip.method.acr import CompactCorrelation, refine_correlation_compact
from diclip.models.attention_capture import CapturedAttention


def noise_seed(item_id: str, seed: int) -> int:
    """Per-image noise seed: the same image always gets the same noise, on any actor, in any run."""
    return (zlib.crc32(item_id.encode("utf-8")) + 1_000_003 * int(seed)) % (2**31 - 1)


def vce_compact(cap: CapturedAttention, method: MethodConfig, diffusion: DiffusionConfig) -> CompactCorrelation:
    return refine_correlation_compact(
        cap.vce,
        heads=tuple(diffusion.heads),
        threshold=method.corr_threshold,
        num_clusters=method.num_clusters,
        iters=method.cluster_iters,
        size=cap.clip_grid,
        precision=method.acr_precision,
    )


def rar_mean(cap: CapturedAttention) -> torch.Tensor:
    """Head-mean softmax attention of the RAR layer (configured heads): [B, M, M]."""
    return cap.rar_dense().mean(1)
