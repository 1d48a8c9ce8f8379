"""Where the Trainer's data comes from and how it is drawn: shuffled orders equal to a plain
loop's, samplers' epochs, limits, steps without ``batch_idx`` and the ``DataModule``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


def _shuffling(samples: int = 16, seed: int = 1) -> DataLoader:
    data = TensorDataset(torch.randn(samples, 4), torch.arange(samples).float().unsqueeze(1))
    return DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


class Recording(TinyModule):
    """Records the targets (sample indices) of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[list[int]]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.seen[-1].append([int(value) for value in batch[1].flatten()])
        return super().training_step(batch, batch_idx)


def test_trainer_draws_the_plain_loaders_shuffled_order_every_epoch() -> None:
    plain = _shuffling()
    expected = [[[int(v) for v in batch[1].flatten()] for batch in plain] for _ in range(3)]
    module = Recording()
    Trainer(max_epochs=3, **bare_trainer_kwargs()).fit(module, _shuffling(), _shuffling(8, 2))
    assert module.seen == expected


@pytest.mark.parametrize(
    ("val_loader", "kwargs"),
    [(None, {}), (loader(8), {"limit_val_batches": 0})],
    ids=["no validation loader", "limit_val_batches=0"],
)
def test_val_check_interval_longer_than_the_epoch_without_validation(
    val_loader: Any, kwargs: dict[str, Any]
) -> None:
    trainer = Trainer(max_epochs=2, val_check_interval=100, **kwargs, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(16), val_loader)  # validation is off: nothing to check
    assert trainer.global_step == 4
