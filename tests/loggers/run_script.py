"""Run by ``test_trainer_runs.py`` in a subprocess, so that the loggers' runs end the way they
end for a user: at process exit. ``python run_script.py MODE ROOT``:

- ``fit_test``: ``fit`` then ``test`` with a CSV, a TensorBoard and a W&B logger (and a
  ``MemoryLogger`` whose record goes to ``ROOT/expected.json``); exits normally.
- ``crash``: the same loggers; the fit writes a checkpoint after batch ``CRASH_AT`` and then
  fails, uncaught (the process exits with an error).
- ``resume``: new loggers continue the crashed run from its checkpoint, then ``test``.
- ``kill``: a CSV logger only; the process kills itself with SIGKILL at the start of step
  ``KILL_AT`` (nothing after that point runs: no ``finally``, no ``atexit``).

W&B must be kept offline and inside ``ROOT`` by the caller (WANDB_MODE and WANDB_*_DIR).
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
from ember.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

CRASH_AT = 7  # batches: the crashed fit's checkpoint is at step 7 of 16
KILL_AT = 9  # the step whose start the killed process does not survive
LOG_EVERY = 2


class Regression(TrainModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


def loader(seed: int, samples: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class Recorder(Logger):
    """Everything the Trainer sends, in order, for the parent to compare the files against."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[list[Any]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append([step, {name: float(value) for name, value in metrics.items()}])

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        pass

    def save(self) -> None:
        self.path.write_text(json.dumps(self.calls))

    def finalize(self, status: str) -> None:
        with self.path.with_suffix(".finalized").open("a") as file:
            file.write(f"{status}\n")


class Crash(Callback):
    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == CRASH_AT:
            trainer.save_checkpoint(Path(sys.argv[2]) / "checkpoint")
            raise RuntimeError("crash")


class Kill(Callback):
    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(root: Path, loggers: list[Logger], callbacks: list[Callback]) -> Trainer:
    return Trainer(
        max_epochs=2,
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=LOG_EVERY,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(mode: str, root: Path) -> None:
    ember.seed_everything(0)
    if mode == "kill":
        trainer(root, [CSVLogger(root / "logs")], [Kill()]).fit(Regression(), loader(0))
        raise AssertionError("the process should have been killed")
    loggers: list[Logger] = [
        CSVLogger(root / "logs"),
        TensorBoardLogger(root / "logs"),
        WandbLogger(project="ember-tests", save_dir=root),
        Recorder(root / f"expected-{mode}.json"),
    ]
    module = Regression()
    if mode == "fit_test":
        run = trainer(root, loggers, [])
        run.fit(module, loader(0), loader(1))
        run.test(module, loader(2))
    elif mode == "crash":
        trainer(root, loggers, [Crash()]).fit(module, loader(0), loader(1))
    elif mode == "resume":
        run = trainer(root, loggers, [])
        run.fit(module, loader(0), loader(1), ckpt_path=root / "checkpoint")
        run.test(module, loader(2))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
