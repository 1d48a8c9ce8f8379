"""Run control: accelerator aliases, configure_callbacks, min/max limits, max_time,
estimated_stepping_batches, fast_dev_run, overfit_batches and the model summary."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ember import Callback, MisconfigurationError, Trainer
from ember.callbacks import EarlyStopping, ModelCheckpoint
from tests.helpers import MemoryLogger, TinyModule, bare_trainer_kwargs, loader, regression_data


# --- accelerator="gpu" -------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("name", ["cuda", "gpu"], ids=["cuda", "alias"])
def test_gpu_is_cuda_and_fails_clearly_without_it(name: str) -> None:
    with pytest.raises(MisconfigurationError, match=f"accelerator='{name}'.*no CUDA device"):
        Trainer(accelerator=name, **bare_trainer_kwargs())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_runs_on_cuda() -> None:
    trainer = Trainer(accelerator="gpu", max_steps=1, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader())
    assert trainer.accelerator.device.type == "cuda"


def test_unknown_accelerator_lists_gpu() -> None:
    with pytest.raises(MisconfigurationError, match="'gpu'"):
        Trainer(accelerator="tpu", **bare_trainer_kwargs())


# --- configure_callbacks -----------------------------------------------------------------------
class Recorder(Callback):
    def __init__(self, events: list[str], name: str) -> None:
        self.events, self.name = events, name

    def on_train_batch_end(self, *args: Any) -> None:
        self.events.append(self.name)

    def on_validation_end(self, *args: Any) -> None:
        self.events.append(f"{self.name}:validation_end")


class Writer(Recorder):
    """A callback that writes checkpoints (it must run after every other one)."""

    writes_checkpoints = True


class WithCallbacks(TinyModule):
    def __init__(self, made: list[Callback]) -> None:
        super().__init__()
        self.made = made

    def configure_callbacks(self) -> Any:
        return self.made


def test_configure_callbacks_join_and_replace_same_type() -> None:
    events: list[str] = []
    trainer_stop = EarlyStopping(monitor="val_loss", patience=100)
    module_stop = EarlyStopping(monitor="val_loss", patience=1000)
    writer = Writer(events, "writer")
    module = WithCallbacks([Recorder(events, "module"), module_stop])
    trainer = Trainer(
        max_steps=2,
        callbacks=[writer, trainer_stop],
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader(), loader())
    assert module_stop in trainer.callbacks and trainer_stop not in trainer.callbacks
    assert writer in trainer.callbacks
    # The checkpoint writer still runs after the module's callback.
    batch_events = [event for event in events if ":" not in event]
    assert batch_events[:2] == ["module", "writer"]
    # validate / test / predict attach them too (new instances replace the old ones).
    events.clear()
    module.made = [Recorder(events, "again")]
    trainer.validate(module, loader())
    assert events == ["again:validation_end", "writer:validation_end"]
    assert (
        sum(isinstance(cb, Recorder) and not isinstance(cb, Writer) for cb in trainer.callbacks)
        == 1
    )


def test_configure_callbacks_single_and_wrong_type() -> None:
    events: list[str] = []
    module = WithCallbacks([])
    module.configure_callbacks = lambda: Recorder(events, "one")  # type: ignore[method-assign]
    Trainer(max_steps=1, **bare_trainer_kwargs()).fit(module, loader())
    assert events == ["one"]
    module.configure_callbacks = lambda: ["not a callback"]  # type: ignore[method-assign]
    with pytest.raises(MisconfigurationError, match="configure_callbacks.*str"):
        Trainer(max_steps=1, **bare_trainer_kwargs()).fit(module, loader())


# --- min_epochs / min_steps ----------------------------------------------------------------
class StopAt(Callback):
    """Asks to stop at every batch end from global step ``step`` on, recording where."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.asked: list[int] = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            self.asked.append(trainer.global_step)
            trainer.should_stop = True


@pytest.mark.parametrize(
    ("limits", "expected_steps", "expected_epoch"),
    [
        ({}, 1, 0),  # stops at once, mid-epoch
        ({"min_steps": 5}, 5, 0),
        ({"min_epochs": 2}, 16, 2),  # 8 batches per epoch: held to the end of epoch 1
        ({"min_epochs": 1, "min_steps": 10}, 10, 1),
        ({"min_epochs": 3, "max_epochs": 2}, 16, 2),  # max_epochs wins
        ({"min_steps": 50, "max_steps": 6}, 6, 0),  # max_steps wins
    ],
)
def test_min_epochs_and_min_steps_hold_off_a_stop(
    limits: dict[str, int], expected_steps: int, expected_epoch: int
) -> None:
    stopper = StopAt(step=1)
    limits = {"max_epochs": 10, **limits}
    trainer = Trainer(callbacks=[stopper], **limits, **bare_trainer_kwargs())  # type: ignore[arg-type]
    trainer.fit(TinyModule(), loader())
    assert trainer.global_step == expected_steps
    assert trainer.current_epoch == expected_epoch
    assert trainer.should_stop  # still asked: held off, not forgotten


def test_min_epochs_holds_off_early_stopping() -> None:
    stopping = EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9)
    trainer = Trainer(callbacks=[stopping], min_epochs=4, max_epochs=10, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(), loader())
    assert trainer.current_epoch == 4


@pytest.mark.parametrize("name", ["min_epochs", "min_steps"])
@pytest.mark.parametrize("value", [-1, 1.5, "3", True])
def test_bad_minimum(name: str, value: Any) -> None:
    with pytest.raises(MisconfigurationError, match=f"`{name}=.*integer >= 0, or None"):
        Trainer(**{name: value}, **bare_trainer_kwargs())


# --- max_time ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("00:12:00:00", 12 * 3600),
        ("1:00:00:30", 86400 + 30),
        (timedelta(minutes=2), 120),
        ({"hours": 1, "minutes": 30}, 5400),
        (None, None),
    ],
)
def test_max_time_forms(value: Any, seconds: float | None) -> None:
    trainer = Trainer(max_time=value, **bare_trainer_kwargs())
    assert (trainer.max_time.total_seconds() if trainer.max_time else None) == seconds
    # With max_time and no other limit, the epochs are not capped at 1000.
    assert trainer.max_epochs == (1000 if value is None else -1)


@pytest.mark.parametrize(
    "value", ["12:00:00", "00:12:99:00:00", "soon", 60, {"hourz": 1}, {}, timedelta(0)]
)
def test_bad_max_time(value: Any) -> None:
    with pytest.raises(MisconfigurationError, match=r"`max_time=.*DD:HH:MM:SS.*timedelta.*dict"):
        Trainer(max_time=value, **bare_trainer_kwargs())


class SlowModule(TinyModule):
    """Each training step takes 40 ms; records the epoch-end hook."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch_ends = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        time.sleep(0.04)
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        self.epoch_ends += 1


def test_max_time_stops_mid_epoch_at_a_step_boundary(tmp_path: Path) -> None:
    module = SlowModule()
    trainer = Trainer(
        max_time={"milliseconds": 150},
        max_epochs=5,
        accumulate_grad_batches=2,
        val_check_interval=2,  # due at every step boundary
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader(samples=160), loader())  # 20 batches, 10 steps per epoch
    assert trainer.should_stop
    assert 1 <= trainer.global_step < 10 and trainer.current_epoch == 0
    # At a window boundary, the batch position kept (the checkpoint resumes the epoch there).
    assert trainer.state.batch_idx == 2 * trainer.global_step
    assert module.epoch_ends == 1  # the epoch-end hooks ran
    assert "val_loss" in trainer.callback_metrics  # the validation due at the stop ran
    saved = torch.load(
        next(tmp_path.glob("last-*")) / "state.pt", weights_only=True, map_location="cpu"
    )
    assert saved["loop"]["batch_idx"] == trainer.state.batch_idx


def test_max_time_is_held_off_by_min_steps() -> None:
    trainer = Trainer(
        max_time={"milliseconds": 1}, min_steps=4, max_epochs=3, **bare_trainer_kwargs()
    )
    trainer.fit(SlowModule(), loader())
    assert trainer.global_step == 4


# --- estimated_stepping_batches ----------------------------------------------------------------
class OneCycle(TinyModule):
    """Sizes a OneCycleLR with ``estimated_stepping_batches`` (it raises if stepped more)."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        self.estimate = self.trainer.estimated_stepping_batches
        if self.estimate == float("inf"):
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.1, total_steps=int(self.estimate)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        data = regression_data(16)
        return iter(zip(data.tensors[0].split(4), data.tensors[1].split(4), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_epochs": 2}, 16),  # 8 batches per epoch
        ({"max_epochs": 2, "accumulate_grad_batches": 3}, 6),  # 3 + 3 + a short window of 2
        ({"max_epochs": 3, "limit_train_batches": 5, "accumulate_grad_batches": 2}, 9),
        ({"max_epochs": 3, "limit_train_batches": 0.5}, 12),
        ({"max_steps": 5}, 5),
        ({"max_epochs": 1, "max_steps": 50}, 8),
    ],
)
def test_estimated_stepping_batches(kwargs: dict[str, Any], expected: int) -> None:
    module = OneCycle()
    trainer = Trainer(**kwargs, **bare_trainer_kwargs())
    trainer.fit(module, loader())
    assert module.estimate == expected == trainer.estimated_stepping_batches
    assert trainer.global_step == expected  # the schedule's length was exactly right


def test_estimated_stepping_batches_without_a_length() -> None:
    module = OneCycle()
    Trainer(max_epochs=2, **bare_trainer_kwargs()).fit(
        module, DataLoader(Stream(), batch_size=None)
    )
    assert module.estimate == float("inf")
    module = OneCycle()
    Trainer(max_steps=3, **bare_trainer_kwargs()).fit(module, DataLoader(Stream(), batch_size=None))
    assert module.estimate == 3


def test_estimated_stepping_batches_outside_fit() -> None:
    with pytest.raises(
        MisconfigurationError, match="estimated_stepping_batches.*configure_optimizers"
    ):
        _ = Trainer(**bare_trainer_kwargs()).estimated_stepping_batches


# --- fast_dev_run ------------------------------------------------------------------------------
class Counting(TinyModule):
    """Counts the batches each loop ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {"train": 0, "val": 0, "test": 0, "predict": 0}
        self.train_batches: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.seen["train"] += 1
        self.train_batches.append(batch[0])
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen["val"] += 1
        self.val_batch = batch[0]
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.seen["test"] += 1
        super().test_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen["predict"] += 1
        return super().predict_step(batch, batch_idx)


@pytest.mark.parametrize(("value", "batches"), [(True, 1), (3, 3)])
def test_fast_dev_run_runs_n_batches_and_writes_nothing(
    value: bool | int, batches: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = Counting()
    trainer = Trainer(
        fast_dev_run=value,
        max_epochs=50,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(monitor="val_loss"), EarlyStopping(monitor="val_loss")],
        enable_progress_bar=False,
    )
    trainer.fit(module, loader(), loader())
    trainer.test(module, loader())
    trainer.predict(module, loader())
    assert module.seen == {"train": batches, "val": batches, "test": batches, "predict": batches}
    assert trainer.global_step == batches and trainer.current_epoch == 1
    assert trainer.loggers == [] and trainer.checkpoint_callback is None
    assert list(tmp_path.iterdir()) == []  # no logs, no checkpoints/ folder
    assert "Total params" not in capsys.readouterr().out  # no model summary


@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_bad_fast_dev_run(value: Any) -> None:
    with pytest.raises(MisconfigurationError, match=r"`fast_dev_run=.*True.*integer n >= 0"):
        Trainer(fast_dev_run=value, **bare_trainer_kwargs())


# --- overfit_batches ---------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "batches"), [(2, 2), (0.25, 2)])
def test_overfit_batches_trains_and_validates_on_the_first_batches(
    value: int | float, batches: int
) -> None:
    module = Counting()
    data = loader(shuffle=True)
    trainer = Trainer(overfit_batches=value, max_epochs=3, **bare_trainer_kwargs())
    with pytest.warns(UserWarning) as caught:
        trainer.fit(module, data, loader(samples=8, seed=5))
    messages = " ".join(str(warning.message) for warning in caught)
    assert "turns shuffling off" in messages and "validation loaders given are not used" in messages
    first = list(data.dataset.tensors[0].split(8))[:batches]
    assert module.seen["train"] == 3 * batches
    for index, batch in enumerate(module.train_batches):  # unshuffled, the same each epoch
        assert torch.equal(batch, first[index % batches])
    assert torch.equal(module.val_batch, first[-1])  # validated on the training batches


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_bad_overfit_batches(value: Any) -> None:
    with pytest.raises(MisconfigurationError, match=r"`overfit_batches=.*fraction between"):
        Trainer(overfit_batches=value, **bare_trainer_kwargs())


# --- a stop by should_stop mid-epoch -----------------------------------------------------------
class EpochLogging(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.epoch_ends: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("epoch_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.epoch_ends.append(self.trainer.state.batch_idx)
        self.log("ended_at", float(self.trainer.global_step))


def test_should_stop_mid_epoch_runs_due_validation_epoch_end_and_epoch_logging(
    tmp_path: Path,
) -> None:
    module = EpochLogging()
    logger = MemoryLogger()
    trainer = Trainer(
        max_epochs=3,
        val_check_interval=3,
        callbacks=[StopAt(step=3), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader(), loader())  # 8 batches per epoch
    assert trainer.global_step == 3 and trainer.current_epoch == 0
    assert trainer.state.batch_idx == 3  # the position in the epoch is kept
    assert logger.values("val_loss") and logger.values("val_loss")[0][0] == 3  # due at batch 3
    assert module.epoch_ends == [3]  # epoch-end hooks ran
    assert [step for step, _ in logger.values("epoch_loss")] == [3]  # epoch-level logging
    assert [value for _, value in logger.values("ended_at")] == [3.0]
    saved = torch.load(next(tmp_path.glob("last-*")) / "state.pt", weights_only=True)
    assert saved["loop"]["batch_idx"] == 3 and saved["loop"]["epoch"] == 0


def test_fast_dev_run_leaves_out_the_module_checkpoint_callback(tmp_path: Path) -> None:
    module = WithCallbacks([ModelCheckpoint(dirpath=tmp_path / "mine")])
    trainer = Trainer(fast_dev_run=True, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(module, loader())
    assert trainer.checkpoint_callback is None and list(tmp_path.iterdir()) == []
