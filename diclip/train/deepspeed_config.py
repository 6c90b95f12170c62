"""The DeepSpeed config of the train stage: ``configs/deepspeed.yaml`` with ``auto`` values filled from
the job spec, and the checks that turn impossible combinations into one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from diclip.config import JobSpec
from diclip.errors import ConfigError


def _find(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    repo = Path(__file__).resolve().parents[2] / path
    if repo.is_file():
        return repo
    raise ConfigError(f"train.deepspeed_config: file not found: {path}")


def check_train_spec(spec: JobSpec) -> None:
    t = spec.train
    if t.zero_stage == 3 and not t.use_gpu:
        raise ConfigError("train.zero_stage=3 is not available on CPU workers (gloo; ZeRO-3/offload need GPUs): "
                          "use zero_stage 1 or 2")
    if t.use_gpu and spec.train.resources.num_gpus <= 0:
        raise ConfigError("train.use_gpu is true but train.resources.num_gpus is 0")
    if t.global_batch is not None:
        per_step = t.num_workers * t.grad_accum
        if t.global_batch % per_step:
            raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by num_workers x grad_accum "
                              f"= {t.num_workers} x {t.grad_accum}")
    if spec.data.crop_size % 16:
        raise ConfigError("data.crop_size must be a multiple of 16")


def per_worker_batch(spec: JobSpec) -> int:
    t = spec.train
    if t.global_batch is not None:
        return t.global_batch // (t.num_workers * t.grad_accum)
    return t.batch_per_worker


def bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(spec: JobSpec, use_gpu: bool) -> str:
    """fp32 | bf16 | fp16 for the trainable heads; ``auto`` is bf16 on GPUs that support it, else fp32."""
    p = spec.train.precision
    if p == "auto":
        return "bf16" if use_gpu and bf16_supported() else "fp32"
    if p == "fp16" and not use_gpu:
        raise ConfigError("train.precision=fp16 needs GPUs (no fp16 kernels on CPU); use bf16 or fp32")
    return p


def build_deepspeed_config(spec: JobSpec, use_gpu: bool | None = None) -> dict[str, Any]:
    """Resolve ``auto`` entries from the spec; precision from ``train.precision`` (see :func:`resolve_precision`).

    An explicit ``bf16.enabled``/``fp16.enabled`` in the DeepSpeed YAML must agree with it."""
    check_train_spec(spec)
    t = spec.train
    use_gpu = t.use_gpu if use_gpu is None else use_gpu
    with open(_find(t.deepspeed_config)) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{t.deepspeed_config}: expected a mapping")

    def fill(d: dict, key: str, value: Any) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(cfg, "train_micro_batch_size_per_gpu", per_worker_batch(spec))
    fill(cfg, "gradient_accumulation_steps", t.grad_accum)
    fill(cfg, "gradient_clipping", float(t.grad_clip))
    zero = cfg.setdefault("zero_optimization", {})
    fill(zero, "stage", t.zero_stage)
    if zero["stage"] == 3 and not use_gpu:
        raise ConfigError(f"{t.deepspeed_config}: zero_optimization.stage 3 needs GPUs; use 1 or 2 on CPU")
    precision = resolve_precision(spec, bool(use_gpu))
    bf16 = cfg.setdefault("bf16", {})
    fp16 = cfg.setdefault("fp16", {})
    for section, name in ((bf16, "bf16"), (fp16, "fp16")):
        want = precision == name
        if section.get("enabled", "auto") not in ("auto", want):
            raise ConfigError(f"{t.deepspeed_config}: {name}.enabled={section['enabled']} contradicts "
                              f"train.precision={t.precision} (resolved: {precision}); set it to auto")
        section["enabled"] = want
    if precision == "fp16":
        fp16.setdefault("loss_scale", 0)  # dynamic
        fp16.setdefault("initial_scale_power", 16)
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    fill(params, "lr", t.lr * t.lr_mult)
    fill(params, "betas", list(t.betas))
    fill(params, "weight_decay", t.weight_decay)
    params.setdefault("torch_adam", True)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * t.num_workers
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f"{t.deepspeed_config}: cannot fill 'auto' for {', '.join(leftover)}")
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
