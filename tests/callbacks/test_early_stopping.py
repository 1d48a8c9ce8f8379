"""EarlyStopping: patience, modes, min_delta, thresholds, non-finite values, errors, state."""

from __future__ import annotations

import io
import math
import re
from typing import Any

import pytest
import torch

from ember import MisconfigurationError, Trainer
from ember.callbacks import EarlyStopping
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


class Scripted(TinyModule):
    """Logs ``val_loss`` = the next value of a script at each validation run."""

    def __init__(self, values: list[float], name: str = "val_loss") -> None:
        super().__init__()
        self.values = values
        self.name = name
        self.runs = 0  # validation runs seen (the sanity check included)

    def on_validation_epoch_start(self) -> None:
        self.runs += 1

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # The sanity check logs a value far better than any in the script: were it judged,
        # nothing after it would count as an improvement.
        value = -1e9 if self.trainer.sanity_checking else self.values[self.current_epoch]
        self.log(self.name, value)


def _fit(
    values: list[float], stopper: EarlyStopping, epochs: int | None = None, **kwargs: Any
) -> Trainer:
    options: dict[str, Any] = {"num_sanity_val_steps": 0, **bare_trainer_kwargs(), **kwargs}
    trainer = Trainer(max_epochs=epochs or len(values), callbacks=[stopper], **options)
    trainer.fit(Scripted(values), loader(16, batch_size=8), loader(8, batch_size=8))
    return trainer


@pytest.mark.parametrize(
    ("values", "options", "stopped_epoch"),
    [
        ([5.0, 4.0, 4.5, 4.2, 4.1, 3.0], {"patience": 2}, 3),
        ([5.0, 4.0, 4.5, 3.9, 4.1, 4.2], {"patience": 2}, 5),  # 3.9 resets the count
        ([5.0, 5.0, 1.0], {"patience": 0}, 1),  # equal is not better
        ([1.0, 2.0, 1.5, 1.8, 2.5], {"patience": 2, "mode": "max"}, 3),
        ([5.0, 4.8, 4.6, 4.0, 3.0], {"patience": 2, "min_delta": 0.5}, 2),
        ([1.0, 1.4, 2.0, 2.2, 2.3], {"patience": 2, "min_delta": 0.5, "mode": "max"}, 4),
    ],
)
def test_stops_after_patience_checks_without_improvement(
    values: list[float], options: dict[str, Any], stopped_epoch: int
) -> None:
    stopper = EarlyStopping("val_loss", **options)
    trainer = _fit(values, stopper, epochs=len(values) + 3)
    assert stopper.stopped_epoch == stopped_epoch
    assert trainer.should_stop
    assert trainer.current_epoch == stopped_epoch + 1  # the stopping epoch itself finishes
    assert stopper.wait_count == max(options["patience"], 1)
    assert stopper.reason is not None and "did not improve" in stopper.reason


def test_keeps_training_while_improving() -> None:
    stopper = EarlyStopping("val_loss", patience=1, min_delta=0.1)
    trainer = _fit([5.0, 4.0, 3.0, 2.0], stopper)
    assert (trainer.current_epoch, trainer.should_stop) == (4, False)
    assert (stopper.stopped_epoch, stopper.wait_count, stopper.reason) == (0, 0, None)
    assert stopper.best_score == 2.0


@pytest.mark.parametrize(
    ("values", "options", "stopped_epoch", "in_reason"),
    [
        ([5.0, 3.0, 0.5, 0.1], {"stopping_threshold": 1.0}, 2, "below stopping_threshold=1.0"),
        ([0.1, 0.5, 0.95, 0.99], {"mode": "max", "stopping_threshold": 0.9}, 2, "above"),
        ([5.0, 4.0, 20.0, 3.0], {"divergence_threshold": 10.0}, 2, "above divergence_threshold"),
        ([0.5, 0.6, 0.01, 0.7], {"mode": "max", "divergence_threshold": 0.1}, 2, "below"),
        ([5.0, math.nan, 3.0], {}, 1, "not finite"),
        ([5.0, 4.0, math.inf], {}, 2, "not finite"),
    ],
)
def test_thresholds_and_non_finite_values_stop_at_once(
    values: list[float], options: dict[str, Any], stopped_epoch: int, in_reason: str
) -> None:
    stopper = EarlyStopping("val_loss", patience=100, **options)
    _fit(values, stopper, epochs=len(values) + 2)
    assert stopper.stopped_epoch == stopped_epoch
    assert stopper.reason is not None and in_reason in stopper.reason


def test_non_finite_values_are_ignored_without_check_finite() -> None:
    stopper = EarlyStopping("val_loss", patience=100, check_finite=False)
    trainer = _fit([5.0, math.nan, 3.0], stopper)
    assert not trainer.should_stop
    assert stopper.best_score == 3.0


def test_prints_the_reason_once(capsys: pytest.CaptureFixture[str]) -> None:
    stopper = EarlyStopping("val_loss", patience=1)
    _fit([5.0, 6.0, 7.0], stopper)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("EarlyStopping: val_loss did not improve")
    assert stopper.reason is not None and stopper.reason in lines[0]


def test_patience_counts_validation_runs_not_epochs() -> None:
    """Validating every 2 batches, it can stop in the middle of an epoch."""
    checked: list[float] = []

    class EveryRun(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            value = [3.0, 2.0, 2.5, 2.6, 1.0][len(checked)]
            self.log("val_loss", value)

        def on_validation_end(self) -> None:
            checked.append(self.trainer.callback_metrics["val_loss"])

    stopper = EarlyStopping("val_loss", patience=1)
    trainer = Trainer(
        max_epochs=5,
        val_check_interval=2,
        num_sanity_val_steps=0,
        callbacks=[stopper],
        **bare_trainer_kwargs(),
    )
    trainer.fit(EveryRun(), loader(64, batch_size=8), loader(8, batch_size=8))  # 8 batches
    assert checked == [3.0, 2.0, 2.5]  # stopped after batch 6 of 8
    assert (trainer.global_step, trainer.current_epoch, stopper.stopped_epoch) == (6, 0, 0)


def test_sanity_check_and_validate_are_not_judged() -> None:
    stopper = EarlyStopping("val_loss", patience=0)
    module = Scripted([5.0, 4.0, 3.0])
    trainer = Trainer(
        max_epochs=3, num_sanity_val_steps=1, callbacks=[stopper], **bare_trainer_kwargs()
    )
    trainer.fit(module, loader(16, batch_size=8), loader(8, batch_size=8))
    assert module.runs == 4  # the sanity check ran, but its -1e9 was not taken as the best
    assert (stopper.best_score, trainer.should_stop) == (3.0, False)
    module.values = [10.0] * 5
    trainer.validate(module, loader(8, batch_size=8))  # worse, but outside fit
    assert (stopper.wait_count, stopper.best_score) == (0, 3.0)


def test_without_validation_it_checks_after_each_training_epoch() -> None:
    class TrainMetric(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            value = [3.0, 2.0, 2.0, 2.0][self.current_epoch]
            self.log("train_metric", value, on_step=False, on_epoch=True)
            return super().training_step(batch, batch_idx)

    stopper = EarlyStopping("train_metric", patience=1)
    trainer = Trainer(max_epochs=4, callbacks=[stopper], **bare_trainer_kwargs())
    trainer.fit(TrainMetric(), loader(16, batch_size=8))
    assert (stopper.stopped_epoch, trainer.current_epoch) == (2, 3)


def test_a_monitor_never_logged_lists_the_logged_names() -> None:
    stopper = EarlyStopping("val_acc")
    with pytest.raises(MisconfigurationError, match=r"'val_acc'.*\['train_loss', 'val_loss'\]"):
        _fit([5.0, 4.0], stopper)


def test_state_round_trip_and_separate_keys() -> None:
    stopper = EarlyStopping("val_loss", patience=3)
    _fit([5.0, 4.0, 4.5, 4.6], stopper)
    state = stopper.state_dict()
    assert state == {"wait_count": 2, "best_score": 4.0, "stopped_epoch": 0, "patience": 3}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # checkpoints are read with weights_only=True
    buffer.seek(0)
    restored = EarlyStopping("val_loss")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state_dict() == state
    assert stopper.state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
    keys = {stopper.state_key, EarlyStopping("val_acc", mode="max").state_key}
    keys.add(EarlyStopping("val_loss", mode="max").state_key)
    assert len(keys) == 3
    # Restored, it continues counting: one more check without improvement stops it.
    trainer = _fit([4.7], restored)
    assert (trainer.should_stop, restored.wait_count) == (True, 3)


def test_two_early_stoppings_each_judge_their_metric() -> None:
    class Two(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", [5.0, 4.0, 3.0, 2.0][self.current_epoch])
            self.log("val_acc", [0.5, 0.4, 0.3, 0.2][self.current_epoch])

    loss_stopper = EarlyStopping("val_loss", patience=1)
    acc_stopper = EarlyStopping("val_acc", mode="max", patience=2)
    trainer = Trainer(
        max_epochs=4,
        num_sanity_val_steps=0,
        callbacks=[loss_stopper, acc_stopper],
        **bare_trainer_kwargs(),
    )
    trainer.fit(Two(), loader(16, batch_size=8), loader(8, batch_size=8))
    assert (acc_stopper.stopped_epoch, loss_stopper.reason, trainer.current_epoch) == (2, None, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": ""}, "monitor=''"),
        ({"monitor": None}, "monitor=None"),
        ({"mode": "auto"}, "`mode='auto'` is not supported. Accepted values: 'min', 'max'"),
        ({"patience": -1}, "patience=-1"),
        ({"patience": 1.5}, "patience=1.5"),
        ({"min_delta": -0.1}, "min_delta=-0.1"),
        ({"min_delta": "0.1"}, "min_delta='0.1'"),
        ({"stopping_threshold": "low"}, "stopping_threshold='low'"),
        ({"divergence_threshold": math.nan}, "divergence_threshold=nan"),
        ({"check_finite": "yes"}, "check_finite='yes'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments = {"monitor": "val_loss", **kwargs}
    with pytest.raises(MisconfigurationError, match=re.escape(message)):
        EarlyStopping(**arguments)
