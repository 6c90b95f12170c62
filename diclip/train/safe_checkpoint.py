"""DeepSpeed checkpoints read with ``torch.load(weights_only=True)``.

DeepSpeed's own ``TorchCheckpointEngine`` loads with ``weights_only=False``, so a checkpoint from
elsewhere (a shared bucket, a colleague's run) could run code when a job resumes from it. Its files
hold only tensors, plain containers and a few DeepSpeed classes (ZeRO stage enum, parameter-fragment
addresses, loss scalers), so the engine installed here allows exactly those and nothing else. A
checkpoint that needs more is refused in one line; ``train.trust_checkpoints=true`` restores
DeepSpeed's full unpickling for checkpoints the user vouches for.
"""
from __future__ import annotations

import pickle
from typing import Any

import torch

from diclip._compat import default_ds_accelerator

default_ds_accelerator()  # before deepspeed is imported: no "Setting accelerator to CPU" warning
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402

from diclip.errors import ModelError


def allowed_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed (ZeRO 0-2, fp32/bf16/fp16) writes into its checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """``torch.load`` of a DeepSpeed file, refusing any class outside :func:`allowed_globals`."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = " ".join(str(e).split("\n")[0].split())[:160]
            needs = torch.serialization.get_unsafe_globals_in_checkpoint(path) if _is_zip(path) else []
            extra = [g for g in needs if g not in {f"{c.__module__}.{c.__qualname__}" for c in allowed_globals()}]
            what = f"it needs {', '.join(extra)}" if extra else first
            raise ModelError(f"{path}: refusing to unpickle this DeepSpeed checkpoint ({what}); resume only from "
                             f"checkpoints you trust, and set train.trust_checkpoints=true to load it anyway") from e


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a weights-only ``load``; saving is unchanged."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_weights_only(path, map_location)


def install(engine: Any, trust: bool = False) -> None:
    """Swap the engine's plain torch checkpoint engine for the weights-only one (unless ``trust``)."""
    if not trust and type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
