"""LearningRateMonitor: the rate each step used, group suffixes, per-epoch values, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ember import MisconfigurationError, Trainer
from ember.callbacks import LearningRateMonitor
from tests.helpers import MemoryLogger, TinyModule, loader


class Scheduled(TinyModule):
    """Two parameter groups or one, an optional scheduler, the optimizer class chosen."""

    def __init__(
        self,
        scheduler: str | None = None,
        groups: int = 1,
        optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    ) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.groups = groups
        self.optimizer_class = optimizer

    def configure_optimizers(self) -> Any:
        if self.groups == 1:
            params: Any = self.parameters()
        else:
            params = [
                {"params": [self.net.weight]},
                {"params": [self.net.bias], "lr": 0.01},
            ]
        optimizer = self.optimizer_class(params, lr=0.1)
        if self.scheduler == "step":  # halves the rate after every step
            halving = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": halving, "interval": "step"},
            }
        if self.scheduler == "epoch":
            return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return optimizer


def _fit(
    module: TinyModule, monitor: LearningRateMonitor, epochs: int = 2, **kwargs: Any
) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = Trainer(
        max_epochs=epochs,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_checkpointing=False,
        **kwargs,
    )
    trainer.fit(module, loader(32, batch_size=8))  # 4 batches per epoch
    return logger


@pytest.mark.parametrize("interval", [None, "step"])
def test_step_interval_logs_the_rate_each_step_used(interval: str | None) -> None:
    logger = _fit(Scheduled("step"), LearningRateMonitor(interval))
    # Step k (counted from 1) ran with 0.1 / 2**(k - 1): logged with that step's values.
    assert logger.values("lr-SGD") == [(step, 0.1 * 0.5 ** (step - 1)) for step in range(1, 9)]


def test_step_interval_logs_once_per_optimizer_step() -> None:
    logger = _fit(Scheduled("step"), LearningRateMonitor("step"), accumulate_grad_batches=2)
    assert logger.values("lr-SGD") == [(step, 0.1 * 0.5 ** (step - 1)) for step in range(1, 5)]


def test_several_groups_get_a_suffix_each_and_the_raw_class_name() -> None:
    logger = _fit(Scheduled("step", groups=2, optimizer=torch.optim.AdamW), LearningRateMonitor())
    first, second = logger.values("lr-AdamW/pg1"), logger.values("lr-AdamW/pg2")
    assert [value for _, value in first] == [0.1 * 0.5**k for k in range(8)]
    assert [value for _, value in second] == pytest.approx([0.01 * 0.5**k for k in range(8)])
    names = {name for _, metrics in logger.metrics for name in metrics}
    assert not any(name.startswith(("lr-AdamW/pg0", "lr-Accelerated")) for name in names)
    assert "lr-AdamW" not in names


@pytest.mark.parametrize(("scheduler", "interval"), [("epoch", None), ("epoch", "epoch")])
def test_epoch_interval_logs_the_rate_of_each_epoch(scheduler: str, interval: str | None) -> None:
    logger = _fit(Scheduled(scheduler), LearningRateMonitor(interval), epochs=3)
    assert logger.values("lr-SGD") == [(4, 0.1), (8, 0.05), (12, 0.025)]


def test_without_a_scheduler_it_logs_once_per_epoch() -> None:
    logger = _fit(Scheduled(), LearningRateMonitor())
    assert logger.values("lr-SGD") == [(4, 0.1), (8, 0.1)]


def test_epoch_interval_with_a_step_scheduler_logs_the_rate_at_epoch_start() -> None:
    logger = _fit(Scheduled("step"), LearningRateMonitor("epoch"))
    assert logger.values("lr-SGD") == [(4, 0.1), (8, 0.1 * 0.5**4)]


def test_a_trainer_without_logger_is_refused_before_training() -> None:
    steps: list[int] = []

    class Counting(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    trainer = Trainer(
        max_epochs=1, logger=False, callbacks=[LearningRateMonitor()], enable_progress_bar=False
    )
    with pytest.raises(MisconfigurationError, match=r"needs a logger.*Trainer\(logger=True\)"):
        trainer.fit(Counting(), loader(16))
    assert steps == []


@pytest.mark.parametrize("interval", ["steps", "batch", 1])
def test_bad_interval(interval: Any) -> None:
    with pytest.raises(
        MisconfigurationError,
        match=f"`logging_interval={interval!r}` is not supported. Accepted values: None, 'step', 'epoch'",
    ):
        LearningRateMonitor(interval)


def test_several_optimizers_get_a_name_each() -> None:
    """Manual optimization with SGD, Adam and a second SGD: each optimizer keeps its own name
    (lr-SGD, lr-Adam, lr-SGD-1) and logs its own rate."""

    class ThreeOptimizers(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.extra = torch.nn.Linear(4, 1)
            self.third = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            loss = ((self.net(x) + self.extra(x) + self.third(x) - y) ** 2).mean()
            self.manual_backward(loss)
            for optimizer in self.optimizers():
                optimizer.step()
                optimizer.zero_grad()

        def configure_optimizers(self) -> Any:
            return [
                torch.optim.SGD(self.net.parameters(), lr=0.1),
                torch.optim.Adam(self.extra.parameters(), lr=0.01),
                torch.optim.SGD(self.third.parameters(), lr=0.3),
            ]

    memory = MemoryLogger()
    trainer = Trainer(
        max_steps=2,
        logger=memory,
        callbacks=[LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=1,
        enable_progress_bar=False,
    )
    trainer.fit(ThreeOptimizers(), loader())
    assert trainer.callback_metrics["lr-SGD"] == pytest.approx(0.1)
    assert trainer.callback_metrics["lr-Adam"] == pytest.approx(0.01)
    assert trainer.callback_metrics["lr-SGD-1"] == pytest.approx(0.3)


class Named(TinyModule):
    """A scheduler dict with a "name" and parameter groups with (or without) "name" keys."""

    def __init__(self, group_names: tuple[str | None, ...], scheduler_name: str | None) -> None:
        super().__init__()
        self.group_names = group_names
        self.scheduler_name = scheduler_name

    def configure_optimizers(self) -> Any:
        tensors = [self.net.weight, self.net.bias]
        groups = []
        for index, name in enumerate(self.group_names):
            group: dict[str, Any] = {"params": tensors[index :: len(self.group_names)]}
            if name is not None:
                group["name"] = name
            groups.append(group)
        optimizer = torch.optim.SGD(groups, lr=0.1)
        scheduler: dict[str, Any] = {
            "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        }
        if self.scheduler_name is not None:
            scheduler["name"] = self.scheduler_name
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


@pytest.mark.parametrize(
    ("group_names", "scheduler_name", "expected"),
    [
        ((None,), "warmup", ["lr-warmup"]),
        (("backbone", "head"), "warmup", ["lr-warmup/backbone", "lr-warmup/head"]),
        (("backbone", "head"), None, ["lr-SGD/backbone", "lr-SGD/head"]),
        (("head",), None, ["lr-SGD/head"]),
        (("backbone", None), None, ["lr-SGD/backbone", "lr-SGD/pg2"]),
    ],
)
def test_scheduler_and_param_group_names_name_the_logged_rates(
    group_names: tuple[str | None, ...], scheduler_name: str | None, expected: list[str]
) -> None:
    logger = _fit(Named(group_names, scheduler_name), LearningRateMonitor())
    names = sorted({name for _, metrics in logger.metrics for name in metrics if "lr" in name})
    assert names == expected
    assert [value for _, value in logger.values(expected[0])] == [0.1, 0.05]


def test_two_param_groups_with_one_name_are_refused() -> None:
    with pytest.raises(MisconfigurationError, match="two parameter groups named 'same'"):
        _fit(Named(("same", "same"), None), LearningRateMonitor())


def test_the_scheduler_name_is_kept_in_its_config() -> None:
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False)
    trainer.fit(Named((None,), "warmup"), loader(16))
    assert trainer.lr_scheduler_configs[0].name == "warmup"
