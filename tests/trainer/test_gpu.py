"""The Trainer on a CUDA device (skipped on machines without one)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ember import Trainer
from tests.helpers import TinyModule, bare_trainer_kwargs, loader

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
def test_fit_on_cuda(precision: str) -> None:
    module = TinyModule(hidden=16, lr=0.05)
    trainer = Trainer(
        accelerator="cuda", max_epochs=4, precision=precision, **bare_trainer_kwargs()
    )
    before = trainer.validate(module, loader(64))[0]["val_loss"]
    trainer.fit(module, loader(64), loader(64))
    assert module.device.type == "cuda"
    assert trainer.callback_metrics["val_loss"] < 0.7 * before


def test_cuda_matches_cpu_in_fp32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for accelerator in ("cpu", "cuda"):
        module = TinyModule(hidden=16)
        Trainer(
            accelerator=accelerator,
            max_epochs=2,
            accumulate_grad_batches=3,
            **bare_trainer_kwargs(),
        ).fit(module, loader(64))
        results.append(torch.cat([p.detach().cpu().flatten() for p in module.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_compile_on_cuda() -> None:
    module = TinyModule(hidden=16)
    trainer = Trainer(accelerator="cuda", max_epochs=1, compile=True, **bare_trainer_kwargs())
    trainer.fit(module, loader(64))
    assert trainer.global_step == 8
    assert torch.isfinite(torch.cat([p.flatten() for p in module.parameters()])).all()


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_batch_transfer_hooks_on_cuda(precision: str) -> None:
    seen: list[tuple[str, str, torch.dtype]] = []

    class Hooked(TinyModule):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            seen.append(("before", batch[0].device.type, batch[0].dtype))
            return batch

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            seen.append(("after", batch[0].device.type, batch[0].dtype))
            return batch

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(("step", batch[0].device.type, batch[0].dtype))
            return super().training_step(batch, batch_idx)

    trainer = Trainer(accelerator="cuda", max_steps=1, precision=precision, **bare_trainer_kwargs())
    trainer.fit(Hooked(), loader(8, batch_size=8))
    # The precision's input cast (bf16-true) comes after on_after_batch_transfer.
    cast = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert seen == [
        ("before", "cpu", torch.float32),
        ("after", "cuda", torch.float32),
        ("step", "cuda", cast),
    ]
