"""Process-wide compatibility shims that must run before torchvision is imported.

PyPI's torchvision 0.28 wheel is built against a CUDA torch; next to the CPU torch wheel its C++
extension fails to register, and ``import torchvision`` (and therefore open_clip, transformers and
diffusers) dies with ``operator torchvision::nms does not exist`` while registering fake kernels.
We try to load the real extension first; if that is impossible we declare the two operator schemas
torchvision's Python side refers to at import time. diclip never calls torchvision C++ ops (images
go through PIL/numpy), so declaring the schemas without kernels is safe.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import torch

_LIB: "torch.library.Library | None" = None  # kept alive: dropping it would unregister the schemas


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def patch_torchvision_ops() -> None:
    """Make ``import torchvision`` work with the CPU torch wheel. Idempotent."""
    global _LIB
    if _has_op("nms"):
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.origin:
        for so in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))):
            try:
                torch.ops.load_library(so)
            except (OSError, RuntimeError):
                continue
            if _has_op("nms"):
                return
    if _has_op("nms"):
        return
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def default_ds_accelerator(cuda: "bool | None" = None) -> str:
    """Set ``DS_ACCELERATOR`` unless the user did (``cuda`` when this process uses CUDA, else ``cpu``); return it.

    DeepSpeed picks its accelerator when it is first imported; left to guess on a machine without CUDA it
    prints "Setting accelerator to CPU ..." as a WARNING in every process that imports it. Call this before
    importing deepspeed. ``cuda=None``: whether this process sees a CUDA device."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")


def skip_unused_deepspeed_ops() -> None:
    """Keep DeepSpeed from JIT-compiling an op training never calls.

    DeepSpeed's CPU accelerator compiles its shared-memory allreduce (``deepspeed_shm_comm``) whenever its
    comm backend starts: 38 s on 2 cores here, ~2.5 min on a 1-CPU pod, on every new node or pod whose
    ``TORCH_EXTENSIONS_DIR`` is empty. That op serves only DeepSpeed-Inference's ``inference_all_reduce``;
    ZeRO training communicates through torch.distributed (gloo). Marking it incompatible in DeepSpeed's op
    registry (a module-level dict that DeepSpeed keeps so that edits persist) skips the build. The CUDA
    accelerator builds nothing at start-up."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
