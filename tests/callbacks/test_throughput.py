"""ThroughputMonitor: when it logs, what it measures (on a scripted clock), no per-batch sync."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from ember import Trainer
from ember.callbacks import ThroughputMonitor
from tests.helpers import MemoryLogger, TinyModule, bare_trainer_kwargs, loader

SAMPLES = "throughput/samples_per_sec"
ITEMS = "throughput/items_per_sec"


class Clock:
    """A scripted ``time.perf_counter``: seconds pass only when the module says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class Timed(TinyModule):
    """Each training batch takes 0.5 s and each validation batch 10 s on ``clock``; records
    every value logged under ``throughput/`` with the step it was logged at."""

    def __init__(self, clock: Clock, num_items: str | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.num_items = num_items
        self.logged: list[tuple[int, str, float]] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        if name.startswith("throughput/"):
            self.logged.append((self.global_step, name, float(value)))
        super().log(name, value, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.clock.now += 0.5
        if self.num_items is None:
            return super().training_step(batch, batch_idx)
        x, y = batch
        # Three items per sample: the loss is a sum over them.
        loss = 3 * torch.nn.functional.mse_loss(self(x), y, reduction="sum")
        items = 3 * x.shape[0]
        return {
            "loss": loss,
            "num_items": torch.tensor(items) if self.num_items == "tensor" else items,
        }

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.clock.now += 10.0
        super().validation_step(batch, batch_idx)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(
        "ember.callbacks.throughput.time", types.SimpleNamespace(perf_counter=clock.perf_counter)
    )
    return clock


def _fit(module: TinyModule, samples: int = 48, epochs: int = 2, **kwargs: Any) -> Trainer:
    options = {"log_every_n_steps": 2, "num_sanity_val_steps": 0, **bare_trainer_kwargs(), **kwargs}
    trainer = Trainer(max_epochs=epochs, callbacks=[ThroughputMonitor()], **options)
    trainer.fit(module, loader(samples, batch_size=8), loader(16, batch_size=8))
    return trainer


def test_logs_samples_per_second_every_n_steps(clock: Clock) -> None:
    module = Timed(clock)
    trainer = _fit(module)  # 6 steps per epoch, validation (20 s) at each epoch's end
    # 2 batches of 8 samples in 1 s; the validation time between epochs is not counted.
    assert module.logged == [(step, SAMPLES, 16.0) for step in (2, 4, 6, 8, 10, 12)]
    assert trainer.callback_metrics[SAMPLES] == 16.0
    assert ITEMS not in trainer.callback_metrics


def test_the_clock_restarts_each_epoch(clock: Clock) -> None:
    class SlowBetweenEpochs(Timed):
        def on_fit_start(self) -> None:
            self.clock.now += 7.0

        def on_train_epoch_end(self) -> None:
            self.clock.now += 5.0

    module = SlowBetweenEpochs(clock)
    _fit(module, samples=40, epochs=2)  # 5 steps per epoch
    # Step 5 (the first epoch's tail) is dropped; the second epoch's first value measures
    # one batch only, from the epoch's start: the 7 s and 5 s outside epochs do not count.
    assert [step for step, _, _ in module.logged] == [2, 4, 6, 8, 10]
    assert all(value == 16.0 for _, _, value in module.logged)


def test_validation_inside_a_window_is_left_out(clock: Clock) -> None:
    module = Timed(clock)
    _fit(module, epochs=1, log_every_n_steps=3, val_check_interval=2)
    assert module.logged == [(3, SAMPLES, 16.0), (6, SAMPLES, 16.0)]


def test_counts_samples_of_every_batch_of_a_window(clock: Clock) -> None:
    module = Timed(clock)
    _fit(module, samples=64, epochs=1, accumulate_grad_batches=2, log_every_n_steps=1)
    assert module.logged == [(step, SAMPLES, 16.0) for step in (1, 2, 3, 4)]


@pytest.mark.parametrize("kind", ["int", "tensor"])
def test_items_per_second_when_the_step_reports_num_items(clock: Clock, kind: str) -> None:
    module = Timed(clock, num_items=kind)
    trainer = _fit(module)
    items = [(step, value) for step, name, value in module.logged if name == ITEMS]
    samples = [(step, value) for step, name, value in module.logged if name == SAMPLES]
    assert items == [(step, 48.0) for step in (2, 4, 6, 8, 10, 12)]
    assert [step for step, _ in samples] == [step for step, _ in items]
    ratio = trainer.callback_metrics[ITEMS] / trainer.callback_metrics[SAMPLES]
    assert ratio == pytest.approx(3.0, abs=1e-6)


def test_real_clock_gives_positive_rates_and_consistent_items() -> None:
    module = Timed(Clock(), num_items="tensor")  # the monitor reads the real clock here
    trainer = _fit(module, epochs=1)
    assert [step for step, name, _ in module.logged if name == SAMPLES] == [2, 4, 6]
    assert all(value > 0 for _, _, value in module.logged)
    ratio = trainer.callback_metrics[ITEMS] / trainer.callback_metrics[SAMPLES]
    assert ratio == pytest.approx(3.0, abs=1e-6)


def test_values_reach_the_loggers(clock: Clock) -> None:
    logger = MemoryLogger()
    _fit(Timed(clock, num_items="tensor"), epochs=1, logger=logger)
    sent = [
        (metrics[SAMPLES], metrics[ITEMS]) for _, metrics in logger.metrics if SAMPLES in metrics
    ]
    assert sent and all(values == (16.0, 48.0) for values in sent)


def test_loggers_get_each_value_at_the_step_it_measured(clock: Clock) -> None:
    logger = MemoryLogger()
    _fit(Timed(clock), epochs=1, logger=logger)
    assert [step for step, metrics in logger.metrics if SAMPLES in metrics] == [2, 4, 6]


def test_no_host_sync_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting .item() calls: tensor item counts are summed on the device, never read per
    batch, so what the monitor adds does not grow with the number of batches."""

    def count_items(samples: int, monitor: bool) -> int:
        calls = 0
        original = torch.Tensor.item

        def counting(self: torch.Tensor) -> Any:
            nonlocal calls
            calls += 1
            return original(self)

        monkeypatch.setattr(torch.Tensor, "item", counting)
        callbacks = [ThroughputMonitor()] if monitor else []
        trainer = Trainer(
            max_epochs=1, log_every_n_steps=1000, callbacks=callbacks, **bare_trainer_kwargs()
        )
        trainer.fit(Timed(Clock(), num_items="tensor"), loader(samples, batch_size=8))
        monkeypatch.setattr(torch.Tensor, "item", original)
        return calls

    extra_short = count_items(128, True) - count_items(128, False)  # 16 batches
    extra_long = count_items(512, True) - count_items(512, False)  # 64 batches
    assert extra_short == extra_long
