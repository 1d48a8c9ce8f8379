"""``Accelerator.state`` and ``distributed_type`` in one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ember import Accelerator, DistributedType, Trainer
from tests.helpers import bare_trainer_kwargs


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_state_names_type_processes_index_device_precision(mixed_precision: str) -> None:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    state = accelerator.state
    assert state.distributed_type is DistributedType.NO is accelerator.distributed_type
    assert (state.num_processes, state.process_index, state.local_process_index) == (1, 0, 0)
    assert state.device == torch.device("cpu") and state.mixed_precision == mixed_precision
    text = repr(state)
    for line in (
        "Distributed environment: NO",
        "Num processes: 1",
        "Process index: 0",
        "Local process index: 0",
        "Device: cpu",
        f"Mixed precision type: {mixed_precision}",
    ):
        assert line in text


def test_state_is_read_only() -> None:
    accelerator = Accelerator(cpu=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        accelerator.state.num_processes = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        accelerator.state = None  # type: ignore[misc,assignment]
    with pytest.raises(AttributeError):
        accelerator.distributed_type = DistributedType.MULTI_GPU  # type: ignore[misc]


def test_distributed_type_has_accelerates_members() -> None:
    names = {member.name for member in DistributedType}
    assert {"NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "XLA", "DEEPSPEED"} <= names
    assert DistributedType("MULTI_CPU") is DistributedType.MULTI_CPU
    assert str(DistributedType.FSDP) == "FSDP"


def test_trainer_accelerator_state() -> None:
    trainer = Trainer(accelerator="cpu", precision="bf16-mixed", **bare_trainer_kwargs())
    assert trainer.accelerator.state.mixed_precision == "bf16"
    assert trainer.accelerator.distributed_type is DistributedType.NO
