"""Where the Trainer's data comes from and how it is drawn: shuffled orders equal to a plain
loop's, samplers' epochs, limits, steps without ``batch_idx`` and the ``DataModule``."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, TensorDataset

from ember import Trainer
from tests.helpers import TinyModule, bare_trainer_kwargs, loader, regression_data


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


class EpochSampler(Sampler[int]):
    """A sequential sampler that records the epochs it is told."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


@pytest.mark.parametrize("inside_batch_sampler", [False, True])
def test_evaluation_samplers_get_the_trainers_epoch(inside_batch_sampler: bool) -> None:
    def val_loader(sampler: EpochSampler) -> DataLoader:
        if inside_batch_sampler:
            batches = BatchSampler(sampler, batch_size=4, drop_last=False)
            return DataLoader(regression_data(8), batch_sampler=batches)
        return DataLoader(regression_data(8), sampler=sampler, batch_size=4)

    train_sampler, val_sampler, test_sampler = EpochSampler(16), EpochSampler(8), EpochSampler(8)
    trainer = Trainer(max_epochs=3, val_check_interval=0.5, **bare_trainer_kwargs())
    train = DataLoader(regression_data(16), sampler=train_sampler, batch_size=4)
    trainer.fit(TinyModule(), train, val_loader(val_sampler))
    assert train_sampler.epochs == [0, 1, 2]
    assert val_sampler.epochs == [0, 0, 0, 1, 1, 2, 2]  # the sanity check, then two per epoch
    trainer.test(dataloaders=val_loader(test_sampler))
    assert test_sampler.epochs == [3]


class Counting(TinyModule):
    """Counts its steps and the events of fit."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls["training_step"] += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.calls["validation_step"] += 1
        super().validation_step(batch, batch_idx)

    def on_fit_start(self) -> None:
        self.calls["on_fit_start"] += 1

    def on_fit_end(self) -> None:
        self.calls["on_fit_end"] += 1

    def on_train_start(self) -> None:
        self.calls["on_train_start"] += 1

    def on_train_epoch_start(self) -> None:
        self.calls["on_train_epoch_start"] += 1


@pytest.mark.parametrize("limit", [0, 0.0])
def test_limit_train_batches_zero_runs_only_the_sanity_check(limit: int | float) -> None:
    module = Counting()
    before = [parameter.detach().clone() for parameter in module.parameters()]
    trainer = Trainer(max_epochs=3, limit_train_batches=limit, **bare_trainer_kwargs())
    trainer.fit(module, loader(16), loader(16))
    assert module.calls == {"on_fit_start": 1, "validation_step": 2, "on_fit_end": 1}
    assert trainer.current_epoch == 0 and trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    # Without validation there is nothing to run, and nothing to complain about.
    Trainer(max_epochs=3, limit_train_batches=limit, **bare_trainer_kwargs()).fit(
        Counting(), loader(16)
    )


class WithoutBatchIdx(TinyModule):
    """Every step takes the batch alone."""

    def training_step(self, batch: Any) -> Any:  # type: ignore[override]
        return super().training_step(batch, 0)

    def validation_step(self, batch: Any) -> None:  # type: ignore[override]
        super().validation_step(batch, 0)

    def test_step(self, batch: Any) -> None:  # type: ignore[override]
        super().test_step(batch, 0)

    def predict_step(self, batch: Any) -> Any:  # type: ignore[override]
        return super().predict_step(batch, 0)


def test_steps_without_batch_idx() -> None:
    module = WithoutBatchIdx()
    trainer = Trainer(max_epochs=2, **bare_trainer_kwargs())
    trainer.fit(module, loader(16), [loader(8), loader(8, seed=1)])  # several: no index either
    assert trainer.global_step == 4
    assert set(trainer.callback_metrics) >= {"val_loss/dataloader_idx_0", "train_loss"}
    assert set(trainer.validate(module, loader(8))[0]) == {"val_loss"}
    assert set(trainer.test(module, loader(8))[0]) == {"test_loss"}
    predictions = trainer.predict(module, loader(8, batch_size=4))
    assert [tuple(p.shape) for p in predictions] == [(4, 1), (4, 1)]
