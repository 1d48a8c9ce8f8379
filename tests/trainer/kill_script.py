"""Run by ``test_kill.py`` in a subprocess: a fit with checkpoints every 3 steps that
continues from ``last`` when there is one. ``EMBER_TEST_KILL_AT=n`` kills the process with
SIGKILL after training batch n (counted over the run); the final weights go to
``<root>/final.safetensors``."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ember
from ember import Callback, Trainer, TrainModule
from ember.callbacks import ModelCheckpoint


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(60, 4, generator=generator), torch.randn(60, 1, generator=generator)
    )
    return DataLoader(data, batch_size=6, shuffle=True)


class Kill(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.state.total_batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main(root: Path) -> None:
    ember.seed_everything(0)
    callbacks: list[Callback] = [ModelCheckpoint(every_n_train_steps=3, save_last=True)]
    if os.environ.get("EMBER_TEST_KILL_AT"):
        callbacks.append(Kill(int(os.environ["EMBER_TEST_KILL_AT"])))
    module = Net()
    trainer = Trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader(), ckpt_path="last")
    save_file(
        {k: v.contiguous() for k, v in module.state_dict().items()}, str(root / "final.safetensors")
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
