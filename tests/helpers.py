"""A tiny module and dataset shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ember import TrainModule
from ember.loggers import Logger


def regression_data(samples: int = 64, features: int = 4, seed: int = 0) -> TensorDataset:
    """``y = x @ w + noise`` with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    weight = torch.randn(features, 1, generator=generator)
    y = x @ weight + 0.1 * torch.randn(samples, 1, generator=generator)
    return TensorDataset(x, y)


def loader(samples: int = 64, batch_size: int = 8, seed: int = 0, **kwargs: Any) -> DataLoader:
    """A loader over ``regression_data`` (not shuffled unless asked)."""
    return DataLoader(regression_data(samples, seed=seed), batch_size=batch_size, **kwargs)


class TinyModule(TrainModule):
    """A linear regression (optionally a small MLP) that logs its losses."""

    def __init__(self, features: int = 4, hidden: int = 0, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1)
            )
        else:
            self.net = nn.Linear(features, 1)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def bare_trainer_kwargs() -> dict[str, Any]:
    """Trainer arguments that switch off everything that writes or prints."""
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }


class MemoryLogger(Logger):
    """A logger that keeps everything it receives, for assertions."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.hparams: dict[str, Any] = {}
        self.status: str | None = None
        self.saves = 0

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)

    def save(self) -> None:
        self.saves += 1

    def finalize(self, status: str) -> None:
        self.status = status

    def values(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every call that logged ``key``."""
        return [(step, metrics[key]) for step, metrics in self.metrics if key in metrics]
