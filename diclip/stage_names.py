"""The pipeline's stage names, in pipeline order.

The stages themselves are declared once, in :mod:`ray_jobs.registry`; this tuple exists so that
:mod:`diclip.config` can check ``pipeline.stages`` while a spec loads without importing the Ray drivers
(the library never depends on them). ``tests/test_registry.py`` checks that the registry declares exactly
these names, in this order.
"""
from __future__ import annotations

STAGE_NAMES: tuple[str, ...] = ("synthesize", "generate", "mask", "cache", "correlate", "train", "evaluate", "infer")
