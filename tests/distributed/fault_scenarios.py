"""Run by ``test_faults.py`` with two processes (gloo, CPU): a DDP fit with checkpoints every
two steps that a process leaves at a chosen batch.

``python fault_scenarios.py OUT MODE`` with MODE:
- ``sigterm``: rank 1 gets SIGTERM after training batch 7 (mid-window); every rank stops at
  the next step boundary, saves ``last`` and exits non-zero.
- ``kill``: on the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), rank 1 kills itself with
  SIGKILL after training batch 9; a restarted group continues from ``last``.
- ``resume``: continue from ``last`` (``ckpt_path="last"``).
After a fit that ends, it runs the same fit uninterrupted (no checkpoints) and rank 0 writes
``OUT/result.json``: whether the weights are equal, bit for bit, and the restart count.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ember
from ember import Callback, Trainer, TrainModule
from ember.accelerator import distributed
from ember.callbacks import ModelCheckpoint


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(48, 4, generator=generator), torch.randn(48, 1, generator=generator)
    )
    return DataLoader(data, batch_size=4, shuffle=True)  # 6 batches per process and epoch


class Leave(Callback):
    """Rank 1 sends itself ``signum`` after training batch ``at`` (counted over the run)."""

    def __init__(self, at: int, signum: int) -> None:
        self.at = at
        self.signum = signum

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.state.total_batch_idx == self.at and trainer.global_rank == 1:
            os.kill(os.getpid(), self.signum)


def fit(out: Path, ckpt_path: str | None, *callbacks: Callback) -> Net:
    ember.seed_everything(0)
    module = Net()
    trainer = Trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=2,
        callbacks=[ModelCheckpoint(every_n_train_steps=2, save_last=True), *callbacks],
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module


def uninterrupted() -> Net:
    ember.seed_everything(0)
    module = Net()
    Trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    ).fit(module, loader())
    return module


def main(out: Path, mode: str) -> None:
    if mode == "sigterm":
        fit(out, None, Leave(7, signal.SIGTERM))  # raises SystemExit on every rank
        return
    if mode == "kill" and distributed.restart_count() == 0:
        fit(out, None, Leave(9, signal.SIGKILL))
        return
    # A restarted group (ckpt_path=None acts as "last"), or an explicit resume.
    resumed = fit(out, "last" if mode == "resume" else None)
    reference = uninterrupted()
    equal = all(
        torch.equal(a, b)
        for a, b in zip(resumed.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    if distributed.global_rank() == 0:
        result = {"equal": equal, "restarts": distributed.restart_count()}
        (out / "result.json").write_text(json.dumps(result))
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
