"""When logged values reach the loggers and under which keys (issue 8)."""

from __future__ import annotations

from typing import Any

from ember import Callback, Trainer
from ember.callbacks import EarlyStopping
from tests.helpers import MemoryLogger, TinyModule, loader


class LogsEpochToo(TinyModule):
    """TinyModule's step loss, plus an epoch value."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("epoch_value", float(batch_idx), on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_step_values_follow_log_every_n_steps_only() -> None:
    # 5 batches per epoch, every 3 steps: epoch ends (5, 10) are not flush points.
    logger = MemoryLogger()
    trainer = Trainer(max_epochs=2, log_every_n_steps=3, logger=logger, enable_progress_bar=False)
    trainer.fit(LogsEpochToo(), loader(40, batch_size=8))
    assert [step for step, m in logger.metrics if "train_loss" in m] == [3, 6, 9]
    assert [step for step, m in logger.metrics if "epoch_value" in m] == [5, 10]


class EvalBothOnStepAndEpoch(TinyModule):
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("test_loss", ((self(x) - y) ** 2).mean(), on_step=True, on_epoch=True)


def test_loader_suffix_goes_after_the_step_and_epoch_suffix() -> None:
    trainer = Trainer(logger=False, enable_progress_bar=False)
    results = trainer.test(EvalBothOnStepAndEpoch(), [loader(16), loader(16, seed=1)])
    assert set(results[0]) == {"test_loss_epoch/dataloader_idx_0"}
    assert set(results[1]) == {"test_loss_epoch/dataloader_idx_1"}
    assert "test_loss_step/dataloader_idx_1" in trainer.callback_metrics


class LogsEverywhere(TinyModule):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", ((self(x) - y) ** 2).mean(), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", ((self(x) - y) ** 2).mean(), prog_bar=True)


def test_each_evaluation_call_starts_with_empty_metrics() -> None:
    trainer = Trainer(
        max_epochs=1, log_every_n_steps=1, logger=MemoryLogger(), enable_progress_bar=False
    )
    module = LogsEverywhere()
    trainer.fit(module, loader(16), loader(16))
    assert {"train_loss", "val_loss"} <= set(trainer.callback_metrics)  # the fit's
    assert "val_loss" in trainer.logged_metrics
    trainer.test(module, loader(16))
    assert set(trainer.callback_metrics) == {"test_loss"}
    assert set(trainer.logged_metrics) == {"test_loss"}
    assert set(trainer.progress_bar_metrics) == {"test_loss"}
    trainer.validate(module, loader(16))
    assert set(trainer.callback_metrics) == {"val_loss"}
    assert set(trainer.logged_metrics) == {"val_loss"}
    trainer.predict(module, loader(16))
    assert trainer.callback_metrics == {}
    assert trainer.logged_metrics == {}
    assert trainer.progress_bar_metrics == {}


class LogsBothOnStepAndEpoch(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("seen", float(batch_idx), on_step=True, on_epoch=True)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", float(batch_idx), on_step=True, on_epoch=True)


def test_plain_name_follows_the_step_then_the_epoch_value() -> None:
    during: list[float] = []

    class Reads(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            during.append(trainer.callback_metrics["seen"])

    early_stopping = EarlyStopping(monitor="val_acc", mode="max", patience=1)
    trainer = Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[Reads(), early_stopping],
    )
    trainer.fit(LogsBothOnStepAndEpoch(), loader(24), loader(24))  # 3 batches each
    assert during[:3] == [0.0, 1.0, 2.0]  # the step value during the epoch
    metrics = trainer.callback_metrics
    assert metrics["seen"] == metrics["seen_epoch"] == 1.0  # the epoch value after it
    assert metrics["val_acc"] == metrics["val_acc_epoch"] == 1.0
    assert early_stopping.stopped_epoch == 1  # it read val_acc: no improvement after epoch 0


def test_evaluation_step_values_reach_the_loggers_per_batch() -> None:
    logger = MemoryLogger()
    trainer = Trainer(
        max_epochs=2, logger=logger, enable_progress_bar=False, num_sanity_val_steps=1
    )
    module = LogsBothOnStepAndEpoch()
    trainer.fit(module, loader(16), loader(24))  # 2 training, 3 validation batches
    assert [step for step, m in logger.metrics if "val_acc_step" in m] == [0, 1, 2, 3, 4, 5]
    values = [m["val_acc_step"] for _, m in logger.metrics if "val_acc_step" in m]
    assert values == [0.0, 1.0, 2.0] * 2
    assert [step for step, m in logger.metrics if "val_acc_epoch" in m] == [2, 4]
    assert all("val_acc_epoch" not in m for _, m in logger.metrics if "val_acc_step" in m)
