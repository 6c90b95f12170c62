"""DeepSpeed checkpoints are read weights-only: tensors and DeepSpeed's few classes load, code does not run.

The positive path on real DeepSpeed files (ZeRO optimizer states, model states) is exercised by the
resume and worker-failure tests in tests/stages/test_train.py, which go through the installed engine.
"""
import os
import types

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from diclip.errors import ModelError
from diclip.train.safe_checkpoint import WeightsOnlyCheckpointEngine, install, load_weights_only


class Payload:
    """Unpickling this runs a command: what a hostile checkpoint would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_deepspeed_state_loads_weights_only(tmp_path):
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    state = {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": scaler,
                                      "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                      "state": {0: {"exp_avg": torch.ones(4)}}},
             "ds_version": "0.19.8"}
    path = str(tmp_path / "optim_states.pt")
    torch.save(state, path)
    got = load_weights_only(path, "cpu")
    opt = got["optimizer_state_dict"]
    assert opt["zero_stage"] is ZeroStageEnum.gradients and isinstance(opt["loss_scaler"], DynamicLossScaler)
    assert opt["loss_scaler"].cur_scale == scaler.cur_scale
    assert opt["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)
    assert torch.equal(opt["state"][0]["exp_avg"], torch.ones(4))


def test_hostile_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"optimizer_state_dict": Payload(str(marker))}, path)
    with pytest.raises(ModelError) as e:
        WeightsOnlyCheckpointEngine().load(path, map_location="cpu")
    msg = str(e.value)
    assert "refusing to unpickle" in msg and "system" in msg and "train.trust_checkpoints=true" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_install_swaps_only_the_plain_torch_engine():
    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), _config=None)
    install(engine)
    assert type(engine.checkpoint_engine) is WeightsOnlyCheckpointEngine
    trusted = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), _config=None)
    install(trusted, trust=True)
    assert type(trusted.checkpoint_engine) is TorchCheckpointEngine
