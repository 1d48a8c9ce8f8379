"""``self.log``: keys, defaults, reductions, Metric objects, loggers, no per-step sync."""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import pytest
import torch
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset

from ember import Callback, MisconfigurationError, Trainer
from ember.callbacks import ProgressBar
from ember.loggers.lifecycle import run_status
from tests.helpers import MemoryLogger, TinyModule, bare_trainer_kwargs, loader


def _values_loader(
    values: list[float], sizes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches whose first tensor has the given sizes and whose 'value' is given."""
    return [
        (torch.full((size, 4), value), torch.zeros(size, 1))
        for value, size in zip(values, sizes, strict=True)
    ]


class LogsBatchValues(TinyModule):
    """Logs the first element of each batch with every reduction, in train and validation."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        value = batch[0][0, 0]
        for reduce_fx in ("mean", "sum", "min", "max"):
            self.log(f"train_{reduce_fx}", value, on_step=False, on_epoch=True, reduce_fx=reduce_fx)
        self.log("both", value, on_step=True, on_epoch=True)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        value = batch[0][0, 0]
        self.log("val_mean", value)
        self.log("val_given_size", value, batch_size=1)
        self.log("val_float", float(value))


def test_epoch_reductions_weighted_by_batch_size() -> None:
    values, sizes = [1.0, 4.0, -2.0], [2, 6, 4]
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=0, **bare_trainer_kwargs())
    batches = _values_loader(values, sizes)
    trainer.fit(LogsBatchValues(), batches, [batches])  # a list of val loaders: one loader
    metrics = trainer.callback_metrics
    weighted = sum(v * s for v, s in zip(values, sizes, strict=True)) / sum(sizes)
    assert metrics["train_mean"] == pytest.approx(weighted)
    assert metrics["train_sum"] == pytest.approx(sum(values))
    assert metrics["train_min"] == pytest.approx(min(values))
    assert metrics["train_max"] == pytest.approx(max(values))
    # Both on_step and on_epoch: two keys (and the plain name in callback_metrics).
    assert metrics["both_step"] == pytest.approx(values[-1])
    assert metrics["both_epoch"] == pytest.approx(weighted)
    assert metrics["both"] == metrics["both_epoch"]  # the plain name: the epoch value
    # Validation defaults to on_epoch; an explicit batch_size changes the weights.
    assert metrics["val_mean"] == pytest.approx(weighted)
    assert metrics["val_float"] == pytest.approx(weighted)
    assert metrics["val_given_size"] == pytest.approx(sum(values) / len(values))


def test_training_defaults_to_step_values_and_flushes_every_n_steps() -> None:
    logger = MemoryLogger()
    trainer = Trainer(max_epochs=1, log_every_n_steps=2, logger=logger, enable_progress_bar=False)
    trainer.fit(TinyModule(), loader(48, batch_size=8), loader(16, batch_size=8))  # 6 steps
    step_logs = [(step, m["train_loss"]) for step, m in logger.metrics if "train_loss" in m]
    assert [step for step, _ in step_logs] == [2, 4, 6]
    assert "train_loss" in trainer.callback_metrics
    assert "train_loss_epoch" not in trainer.callback_metrics
    val_logs = [(step, m) for step, m in logger.metrics if "val_loss" in m]
    assert [step for step, _ in val_logs] == [6]
    assert trainer.logged_metrics["val_loss"] == trainer.callback_metrics["val_loss"]
    # Flushed, not finished: the run ends at process exit (ember.loggers.lifecycle).
    assert logger.status is None and run_status(logger) == "success"
    assert logger.saves >= 1


def test_hyperparameters_reach_the_loggers() -> None:
    class WithHparams(TinyModule):
        def __init__(self, lr: float = 0.1, depth: int = 3, **extra: Any) -> None:
            super().__init__(lr=lr)
            self.save_hyperparameters()

    logger = MemoryLogger()
    module = WithHparams(lr=0.05, width=7)
    assert module.hparams == {"lr": 0.05, "depth": 3, "width": 7}
    assert module.hparams.lr == 0.05
    Trainer(max_epochs=1, logger=logger, enable_progress_bar=False).fit(module, loader(16))
    assert logger.hparams == {"lr": 0.05, "depth": 3, "width": 7}


def test_save_hyperparameters_selects_and_ignores() -> None:
    class Picky(TinyModule):
        def __init__(self, lr: float = 0.1, backbone: Any = None, depth: int = 2) -> None:
            super().__init__(lr=lr)
            self.save_hyperparameters(ignore=["backbone"])

    assert Picky(backbone=torch.nn.Linear(1, 1)).hparams == {"lr": 0.1, "depth": 2}

    class Named(TinyModule):
        def __init__(self, lr: float = 0.1, depth: int = 2) -> None:
            super().__init__(lr=lr)
            self.save_hyperparameters("depth")

    assert Named().hparams == {"depth": 2}

    class Wrong(TinyModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__(lr=lr)
            self.save_hyperparameters("nope")

    with pytest.raises(MisconfigurationError, match="nope"):
        Wrong()


def test_failed_run_ends_the_loggers_run_as_failed() -> None:
    class Broken(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            raise ValueError("broken step")

    logger = MemoryLogger()
    with pytest.raises(ValueError, match="broken step"):
        Trainer(max_epochs=1, logger=logger, enable_progress_bar=False).fit(Broken(), loader(16))
    assert logger.saves >= 1 and run_status(logger) == "failed"  # finalize("failed") at exit


def test_torchmetrics_metric_is_computed_and_reset_each_epoch() -> None:
    class WithMetrics(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.accuracy = torchmetrics.classification.BinaryAccuracy()
            self.seen = torchmetrics.SumMetric()  # counts validation samples
            self.per_epoch: list[tuple[float, float]] = []

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.accuracy(x[:, 0], y[:, 0])
            self.seen(torch.tensor(float(x.shape[0])))
            self.log("val_acc", self.accuracy)
            self.log("val_seen", self.seen)

        def on_validation_epoch_end(self) -> None:
            metrics = self.trainer.callback_metrics
            self.per_epoch.append((metrics["val_acc"], metrics["val_seen"]))

    # Validation data: accuracy of x[:, 0] > 0.5 against y is 3 of 4.
    x = torch.tensor([[0.9], [0.1], [0.8], [0.7]]).repeat(1, 4)
    y = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    val = DataLoader(TensorDataset(x, y), batch_size=2)
    module = WithMetrics()
    trainer = Trainer(max_epochs=3, num_sanity_val_steps=0, **bare_trainer_kwargs())
    trainer.fit(module, loader(16), val)
    # Reset between epochs: each epoch counts its own 4 samples (12 by the third without reset).
    assert module.per_epoch == [(0.75, 4.0), (0.75, 4.0), (0.75, 4.0)]
    assert module.seen.update_count == 0  # reset after the last epoch too


def test_metric_step_values_in_training() -> None:
    epoch_values: list[float] = []

    class TrainMetric(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.total = torchmetrics.SumMetric()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.total(torch.tensor(float(batch_idx + 1)))
            self.log("total", self.total, on_step=True, on_epoch=True)
            return super().training_step(batch, batch_idx)

        def on_train_epoch_end(self) -> None:
            epoch_values.append(self.trainer.callback_metrics["total_epoch"])

    trainer = Trainer(max_epochs=2, **bare_trainer_kwargs())
    trainer.fit(TrainMetric(), loader(24, batch_size=8))
    assert trainer.callback_metrics["total_step"] == 3.0  # the last batch's own value
    assert epoch_values == [6.0, 6.0]  # 1 + 2 + 3 per epoch: reset in between


def test_prog_bar_metrics_and_loss() -> None:
    class Shown(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("shown", 2.0, prog_bar=True)
            self.log("hidden", 3.0)
            return {"loss": loss}

    bar = ProgressBar(stream=io.StringIO())
    trainer = Trainer(max_epochs=1, logger=False, callbacks=[bar])
    module = Shown()
    trainer.fit(module, loader(16))
    assert trainer.progress_bar_metrics == {"shown": 2.0}
    assert "loss" not in trainer.callback_metrics
    # The bar shows the last training loss first, then the prog_bar metrics.
    shown = bar.metrics(trainer)
    assert list(shown) == ["loss", "shown"]
    assert shown["loss"] > 0


def test_logger_false_keeps_value_out_of_loggers() -> None:
    class Private(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.log("private", 1.0, logger=False)
            return super().training_step(batch, batch_idx)

    logger = MemoryLogger()
    Trainer(max_epochs=1, log_every_n_steps=1, logger=logger, enable_progress_bar=False).fit(
        Private(), loader(16)
    )
    assert all("private" not in metrics for _, metrics in logger.metrics)


def test_logging_in_epoch_end_hooks() -> None:
    class EpochEnd(TinyModule):
        def on_train_epoch_end(self) -> None:
            self.log("epoch_value", float(self.current_epoch))

    trainer = Trainer(max_epochs=2, **bare_trainer_kwargs())
    trainer.fit(EpochEnd(), loader(16))
    assert trainer.callback_metrics["epoch_value"] == 1.0


def test_epoch_metrics_are_visible_in_epoch_end_callbacks() -> None:
    seen: dict[str, float] = {}

    class Watch(Callback):
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            seen.update(trainer.callback_metrics)

    class EpochLog(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("epoch_loss", loss, on_step=False, on_epoch=True)
            return loss

    Trainer(max_epochs=1, callbacks=[Watch()], **bare_trainer_kwargs()).fit(EpochLog(), loader(16))
    assert "epoch_loss" in seen


def test_logging_does_not_sync_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting .item() calls: a run that logs every step syncs no more than one that does not."""

    class Logs(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("a", loss * 2, on_step=True, on_epoch=True, prog_bar=True)
            self.log_dict({"b": loss, "c": loss + 1}, on_epoch=True)
            return loss

    class Quiet(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

    def count_items(module: TinyModule, samples: int) -> int:
        calls = 0
        original = torch.Tensor.item

        def counting(self: torch.Tensor) -> Any:
            nonlocal calls
            calls += 1
            return original(self)

        monkeypatch.setattr(torch.Tensor, "item", counting)
        trainer = Trainer(max_epochs=1, log_every_n_steps=1000, **bare_trainer_kwargs())
        trainer.fit(module, loader(samples, batch_size=8))
        monkeypatch.setattr(torch.Tensor, "item", original)
        return calls

    # The loop's own non-finite check reads one value per optimizer step; what logging adds
    # (the epoch-end conversions) must not grow with the number of steps.
    extra_short = count_items(Logs(), 128) - count_items(Quiet(), 128)  # 16 steps
    extra_long = count_items(Logs(), 512) - count_items(Quiet(), 512)  # 64 steps
    assert extra_short == extra_long
    assert extra_long < 16


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.log("x", torch.ones(3)), "shape"),
        (lambda m: m.log("x", "text"), "str"),
        (lambda m: m.log("x", 1.0, reduce_fx="median"), "reduce_fx"),
        (lambda m: m.log("x", 1.0, on_step=False, on_epoch=False), "record nothing"),
        (lambda m: m.log_dict([1, 2]), "dict"),
    ],
)
def test_bad_log_calls(call: Any, message: str) -> None:
    class Bad(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            call(self)
            return super().training_step(batch, batch_idx)

    with pytest.raises(MisconfigurationError, match=message):
        Trainer(max_epochs=1, **bare_trainer_kwargs()).fit(Bad(), loader(16))


def test_log_outside_a_trainer_is_a_clear_error() -> None:
    with pytest.raises(MisconfigurationError, match="not attached to a Trainer"):
        TinyModule().log("x", 1.0)


def test_logger_true_is_tensorboard_when_installed_else_csv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from ember.loggers import CSVLogger, TensorBoardLogger

    # Two steps: log every step, or nothing reaches the files (the default flushes every 50).
    trainer = Trainer(
        max_epochs=1, log_every_n_steps=1, enable_progress_bar=False, default_root_dir=tmp_path
    )
    assert isinstance(trainer.logger, TensorBoardLogger)
    trainer.fit(TinyModule(), loader(16))
    assert trainer.log_dir == str(tmp_path / "ember_logs" / "version_0")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(trainer.log_dir))

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    trainer = Trainer(
        max_epochs=1, log_every_n_steps=1, enable_progress_bar=False, default_root_dir=tmp_path
    )
    assert isinstance(trainer.logger, CSVLogger)
    trainer.fit(TinyModule(), loader(16))
    assert trainer.log_dir == str(tmp_path / "ember_logs" / "version_1")
    assert os.path.exists(os.path.join(trainer.log_dir, "metrics.csv"))
    assert Trainer(logger=False).loggers == []


def test_nothing_of_the_sanity_check_remains() -> None:
    seen: dict[str, float] = {}

    class StepValues(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("v", 1.0, on_step=True, on_epoch=True)

    class AtTrainStart(Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen.update(trainer.callback_metrics)

    logger = MemoryLogger()
    trainer = Trainer(
        max_epochs=1, callbacks=[AtTrainStart()], logger=logger, enable_progress_bar=False
    )
    trainer.fit(StepValues(), loader(16), loader(16))
    assert seen == {}
    assert trainer.callback_metrics["v_epoch"] == 1.0  # the real validation ran and logged
    assert all(step == 2 for step, metrics in logger.metrics if "v_epoch" in metrics)


@pytest.mark.parametrize(
    "hook", ["on_fit_start", "on_train_end", "on_fit_end", "on_validation_end"]
)  # on_train_start logs epoch-level values: tests/trainer/test_logging_rules.py
def test_log_where_nothing_would_record_it_is_an_error(hook: str) -> None:
    def log_here(self: Any, *args: Any) -> None:
        self.log("x", 1.0)

    Module = type("LogsInHook", (TinyModule,), {hook: log_here})
    with pytest.raises(MisconfigurationError, match="self.log\\('x', ...\\) was called where"):
        Trainer(max_epochs=1, num_sanity_val_steps=0, **bare_trainer_kwargs()).fit(
            Module(), loader(16), loader(16)
        )


def test_log_in_predict_step_is_an_error() -> None:
    class LogsInPredict(TinyModule):
        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            self.log("p", 1.0)
            return super().predict_step(batch, batch_idx)

    trainer = Trainer(max_epochs=1, **bare_trainer_kwargs())
    trainer.fit(LogsInPredict(), loader(16))
    with pytest.raises(MisconfigurationError, match="self.log\\('p', ...\\) was called where"):
        trainer.predict(trainer.module, loader(16))
