"""When logged values reach the loggers and under which keys (issue 8)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ember import Callback, MisconfigurationError, Trainer
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


class LogsAtStart(TinyModule):
    def on_train_start(self) -> None:
        self.log("at_train_start", 1.0)

    def on_validation_start(self) -> None:
        self.log("at_validation_start", 2.0)

    def on_test_start(self) -> None:
        self.log("at_test_start", 3.0)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_seen", 1.0)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_seen", 1.0)


def test_log_in_the_start_hooks_is_an_epoch_value() -> None:
    logger = MemoryLogger()
    trainer = Trainer(max_epochs=1, logger=logger, enable_progress_bar=False)
    module = LogsAtStart()
    trainer.fit(module, loader(16), loader(16))
    assert trainer.callback_metrics["at_train_start"] == 1.0
    assert trainer.callback_metrics["at_validation_start"] == 2.0
    assert any(m.get("at_train_start") == 1.0 for _, m in logger.metrics)
    results = trainer.test(module, loader(16))
    assert results == [{"at_test_start": 3.0, "test_seen": 1.0}]


def _fit_logging(hook: str, call: Any) -> None:
    def log_here(self: Any, *args: Any) -> Any:
        call(self)
        if hook == "training_step":
            return TinyModule.training_step(self, *args)
        return None

    Module = type("Logs", (TinyModule,), {hook: log_here})
    Trainer(max_epochs=1, logger=False, enable_progress_bar=False).fit(
        Module(), loader(16), loader(16)
    )


@pytest.mark.parametrize(
    "hook",
    [
        "on_train_start",
        "on_train_epoch_start",
        "on_train_epoch_end",
        "on_validation_start",
        "on_validation_epoch_end",
    ],
)
def test_on_step_in_an_epoch_level_hook_is_an_error(hook: str) -> None:
    with pytest.raises(MisconfigurationError, match="on_step=True.*epoch-level hook"):
        _fit_logging(hook, lambda module: module.log("x", 1.0, on_step=True))


@pytest.mark.parametrize(
    ("second", "option"),
    [
        ({"reduce_fx": "max"}, "reduce_fx"),
        ({"on_step": True, "on_epoch": True}, "on_epoch"),
        ({"sync_dist": True}, "sync_dist"),
    ],
)
def test_one_key_twice_with_different_options_is_an_error(
    second: dict[str, Any], option: str
) -> None:
    def twice(module: Any) -> None:
        module.log("x", 1.0)
        module.log("x", 2.0, **second)

    with pytest.raises(MisconfigurationError, match=f"'x'.*twice.*{option}"):
        _fit_logging("training_step", twice)


def test_one_key_from_a_batch_and_an_epoch_end_hook_is_an_error() -> None:
    class Twice(TinyModule):
        def on_train_epoch_end(self) -> None:
            self.log("train_loss", 0.0)  # TinyModule logs it per step

    with pytest.raises(MisconfigurationError, match="'train_loss'.*twice"):
        Trainer(max_epochs=1, logger=False, enable_progress_bar=False).fit(Twice(), loader(16))


def test_same_key_same_options_in_one_step_is_fine() -> None:
    def twice(module: Any) -> None:
        module.log("x", 1.0)
        module.log("x", 2.0, on_step=True)  # the same as the default in training_step

    _fit_logging("training_step", twice)


def test_a_reserved_loader_suffix_is_an_error() -> None:
    with pytest.raises(MisconfigurationError, match="dataloader_idx_0.*reserved"):
        _fit_logging("training_step", lambda module: module.log("x/dataloader_idx_0", 1.0))


def test_log_dict_takes_a_metric_collection() -> None:
    import torchmetrics

    class WithCollection(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.metrics = torchmetrics.MetricCollection(
                {"max": torchmetrics.MaxMetric(), "min": torchmetrics.MinMetric()},
                prefix="val_",
            )

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.metrics(torch.tensor(float(batch_idx)))
            self.log_dict(self.metrics)

    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False)
    results = trainer.validate(WithCollection(), loader(24))  # 3 batches
    assert results == [{"val_max": 2.0, "val_min": 0.0}]


def test_module_logger_loggers_and_print(capsys: pytest.CaptureFixture[str]) -> None:
    module = TinyModule()
    assert module.logger is None
    assert module.loggers == []
    module.print("without a trainer")
    seen: list[Any] = []

    class Reads(TinyModule):
        def on_train_start(self) -> None:
            seen.extend([self.logger, self.loggers])
            self.print("from rank zero", end="!\n")

    logger = MemoryLogger()
    Trainer(
        max_epochs=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(Reads(), loader(16))
    assert seen == [logger, [logger]]
    assert capsys.readouterr().out.splitlines()[-2:] == ["without a trainer", "from rank zero!"]


def test_module_print_is_silent_off_rank_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Prints(TinyModule):
        def on_train_start(self) -> None:
            self.print("hidden")

    trainer = Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self: False))
    trainer.fit(Prints(), loader(16))
    assert "hidden" not in capsys.readouterr().out


def test_step_values_pending_at_an_epoch_end_checkpoint_go_at_the_next_flush(
    tmp_path: Any,
) -> None:
    # 5 batches per epoch, flush every 3 steps: the checkpoint written at the end of epoch 0
    # (step 5) holds the values of steps 4 and 5, not sent yet. The resumed run sends what
    # the uninterrupted run sends: at steps 6 and 9, nothing at step 5.
    class SaveAtFirstEpochEnd(Callback):
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            if trainer.current_epoch == 0:
                trainer.save_checkpoint(tmp_path / "epoch0")

    def steps_sent(logger: MemoryLogger) -> list[int]:
        return [step for step, m in logger.metrics if "train_loss" in m]

    class LogsOnce(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.current_epoch == 0 and batch_idx == 3:  # step 4
                self.log("once", 4.0)
            return super().training_step(batch, batch_idx)

    options = {"max_epochs": 2, "log_every_n_steps": 3, "enable_progress_bar": False}
    uninterrupted = MemoryLogger()
    Trainer(logger=uninterrupted, callbacks=[SaveAtFirstEpochEnd()], **options).fit(
        LogsOnce(), loader(40, batch_size=8)
    )
    assert steps_sent(uninterrupted) == [3, 6, 9]
    assert [(step, m["once"]) for step, m in uninterrupted.metrics if "once" in m] == [(6, 4.0)]
    resumed = MemoryLogger()
    Trainer(logger=resumed, **options).fit(
        LogsOnce(), loader(40, batch_size=8), ckpt_path=tmp_path / "epoch0"
    )
    assert steps_sent(resumed) == [6, 9]
    assert [(step, m["once"]) for step, m in resumed.metrics if "once" in m] == [(6, 4.0)]
