"""Run control: accelerator aliases, configure_callbacks, min/max limits, max_time,
estimated_stepping_batches, fast_dev_run, overfit_batches and the model summary."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ember import MisconfigurationError, Trainer
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


# --- accelerator="gpu" -------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("name", ["cuda", "gpu"], ids=["cuda", "alias"])
def test_gpu_is_cuda_and_fails_clearly_without_it(name: str) -> None:
    with pytest.raises(MisconfigurationError, match=f"accelerator='{name}'.*no CUDA device"):
        Trainer(accelerator=name, **bare_trainer_kwargs())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_runs_on_cuda() -> None:
    trainer = Trainer(accelerator="gpu", max_steps=1, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader())
    assert trainer.accelerator.device.type == "cuda"


def test_unknown_accelerator_lists_gpu() -> None:
    with pytest.raises(MisconfigurationError, match="'gpu'"):
        Trainer(accelerator="tpu", **bare_trainer_kwargs())
