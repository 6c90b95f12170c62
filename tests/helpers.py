"""Small builders shared by tests (tiny configs, random caches)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diclip.config import ClipConfig, DiffusionConfig, MethodConfig, ModelConfig
from diclip.models.kv_cache import KVCache


def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        clip=ClipConfig(name="diclip-tiny", pretrained=""),
        diffusion=DiffusionConfig(source="tiny"),
        adapter_size=32,
        embedding_dim=32,
        decoder_layers=1,
        decoder_heads=4,
    )


def random_cache(embed_dim: int, classes: list[str], per_class: int = 2, background: int = 3, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    ids = torch.tensor([0] * background + [c for c in range(1, k) for _ in range(per_class)])
    keys = torch.randn(len(ids), embed_dim, generator=g)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return KVCache(keys, F.one_hot(ids, k).float(), {"classes": list(classes)})


def fast_method_config() -> MethodConfig:
    return MethodConfig()
