"""KV adapter: a two-layer MLP whose first layer starts as the cache keys and second as the values.

``fc2(dropout(relu(fc1(x))))`` (dropout 0.1 after both layers). Hidden unit ``i < M`` starts as cache
entry ``i``: its fc1 row is the key, its fc2 column the one-hot value, so at initialisation the
adapter scores a patch by its similarity to each cache entry and routes it to that entry's class.
The remaining hidden units start truncated-normal (std 1, [-2, 2]: timm's default, as the reference).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diclip.errors import ModelError


class KVAdapter(nn.Module):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, hidden: int = 312, dropout: float = 0.1):
        super().__init__()
        m, dim = keys.shape
        if values.shape[0] != m:
            raise ModelError(f"cache has {m} keys but {values.shape[0]} values")
        if m > hidden:
            raise ModelError(f"cache has {m} entries but the adapter has only {hidden} hidden units; "
                             f"raise model.adapter_size to at least {m}")
        num_classes = values.shape[1]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            w1 = nn.init.trunc_normal_(torch.zeros(hidden, dim), std=1.0, a=-2.0, b=2.0)
            w1[:m] = keys.float()
            self.fc1.weight.copy_(w1)
            w2 = nn.init.trunc_normal_(torch.zeros(hidden, num_classes), std=1.0, a=-2.0, b=2.0)
            w2[:m] = values.float()
            self.fc2.weight.copy_(w2.t())
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.relu(self.fc1(x)))))
