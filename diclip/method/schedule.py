"""Learning-rate schedule of the reference optimizer (ToCo's PolyWarmupAdamW), as a multiplier."""
from __future__ import annotations


def poly_warmup_multiplier(step: int, max_iters: int, warmup_iters: int, warmup_ratio: float = 1e-6,
                           power: float = 1.0) -> float:
    """LR multiplier at (0-based) ``step``: linear warmup from ``warmup_ratio``, then poly decay.

    ``1 - (1 - step / warmup) * (1 - ratio)`` during warmup, ``(1 - step / max_iters) ** power``
    after. (Checked against the reference logs: VOC iter 200 -> 1.980e-4 = 2e-4 * (1 - 199/20000).)
    """
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    if step < max_iters:
        return (1.0 - step / max_iters) ** power
    return 0.0
