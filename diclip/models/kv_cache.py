"""The TSA key-value cache as an artifact: safetensors tensors + a JSON card.

``keys`` [M, C] float32 (CLIP features, the CAM feature space), ``values`` [M, K] float32 one-hot with
column 0 = background. Loading checks the cache against the model that will use it and fails with one
line when the feature dimension or the class list disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diclip import storage
from diclip.errors import ModelError

CACHE_FILE = "kv_cache.safetensors"
CARD_FILE = "kv_cache.json"


@dataclass
class KVCache:
    keys: torch.Tensor
    values: torch.Tensor
    card: dict = field(default_factory=dict)
    """classes, counts per class, source manifest, model ids, config hash."""

    @property
    def num_entries(self) -> int:
        return int(self.keys.shape[0])

    def check(self, embed_dim: int, classes: list[str] | tuple[str, ...] | None = None, source: str = "cache") -> None:
        if self.keys.dim() != 2 or self.values.dim() != 2 or self.keys.shape[0] != self.values.shape[0]:
            raise ModelError(f"{source}: malformed cache, keys {tuple(self.keys.shape)} values {tuple(self.values.shape)}")
        if self.keys.shape[1] != embed_dim:
            raise ModelError(f"{source}: cache keys have dim {self.keys.shape[1]} but the CLIP model embeds to "
                             f"{embed_dim}; rebuild the cache with this CLIP model")
        if classes is not None:
            if self.values.shape[1] != len(classes):
                raise ModelError(f"{source}: cache has {self.values.shape[1]} classes but the dataset has "
                                 f"{len(classes)}; wrong class list?")
            card_classes = self.card.get("classes")
            if card_classes is not None and list(card_classes) != list(classes):
                raise ModelError(f"{source}: cache was built for classes {card_classes[:4]}... "
                                 f"not {list(classes)[:4]}...; wrong class list?")


def save_cache(uri: str, cache: KVCache) -> None:
    """Write ``kv_cache.safetensors`` then ``kv_cache.json`` under ``uri``."""
    storage.save_tensors(storage.join(uri, CACHE_FILE),
                         {"keys": cache.keys.float().contiguous(), "values": cache.values.float().contiguous()})
    storage.write_json(storage.join(uri, CARD_FILE), cache.card)


def load_cache(uri: str, embed_dim: int | None = None, classes=None) -> KVCache:
    """Load and (when ``embed_dim``/``classes`` given) validate a cache written by :func:`save_cache`."""
    path = storage.join(uri, CACHE_FILE)
    if not storage.exists(path):
        raise ModelError(f"no KV cache at {uri} (expected {CACHE_FILE}); run the cache stage first")
    tensors, _ = storage.load_tensors(path)
    if "keys" not in tensors or "values" not in tensors:
        raise ModelError(f"{path}: not a KV cache (needs 'keys' and 'values' tensors)")
    card_uri = storage.join(uri, CARD_FILE)
    card = storage.read_json(card_uri) if storage.exists(card_uri) else {}
    cache = KVCache(tensors["keys"].float(), tensors["values"].float(), card)
    if embed_dim is not None:
        cache.check(embed_dim, classes, source=uri)
    return cache
