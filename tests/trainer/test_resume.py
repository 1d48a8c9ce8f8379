"""Exact resume: a fit interrupted at any step and continued from its checkpoint ends with the
same weights, bit for bit, as the fit that was never interrupted (one process, fp32, CPU)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ember
from ember import Callback, CheckpointError, Trainer, TrainModule
from tests.helpers import MemoryLogger, TinyModule, bare_trainer_kwargs, loader


class DropoutNet(TrainModule):
    """Dropout, Adam and a per-step scheduler: every random and stateful part of a run."""

    def __init__(self, hidden: int = 16, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", ((self.net(x) - y) ** 2).mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def shuffled(samples: int = 70, batch_size: int = 7) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 4, generator=generator)
    y = torch.randn(samples, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


class Crash(Callback):
    """Writes a checkpoint after training batch number ``at`` (counted over the run), then
    fails like a crashed process."""

    def __init__(self, at: int, path: Path, event: str = "on_train_batch_end") -> None:
        self.at = at
        self.path = path
        self.event = event

    def _maybe(self, trainer: Trainer) -> None:
        if trainer.state.total_batch_idx == self.at and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("crash")

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.event == "on_train_batch_end":
            self._maybe(trainer)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self.event == "on_train_epoch_end":
            self._maybe(trainer)

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self.event == "on_validation_end":
            self._maybe(trainer)

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self.event == "on_validation_start":
            self._maybe(trainer)


def _weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def _interrupted_and_resumed(
    tmp_path: Path, at: int, event: str = "on_train_batch_end", **kwargs: Any
) -> tuple[dict[str, Tensor], dict[str, Tensor], Trainer]:
    """(weights of the uninterrupted fit, weights of the resumed fit, the resumed trainer)."""
    options = {**bare_trainer_kwargs(), "max_epochs": 3, **kwargs}
    val = kwargs.pop("val", None)
    options.pop("val", None)
    ember.seed_everything(0)
    whole = DropoutNet()
    Trainer(**options).fit(whole, shuffled(), val)
    ember.seed_everything(0)
    crashed = DropoutNet()
    path = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(callbacks=[Crash(at, path, event)], **options).fit(crashed, shuffled(), val)
    ember.seed_everything(1234)  # a new process: other seeds, other initial weights
    resumed = DropoutNet()
    trainer = Trainer(**options)
    trainer.fit(resumed, shuffled(), val, ckpt_path=path)
    return _weights(whole), _weights(resumed), trainer


def _assert_equal(expected: dict[str, Tensor], actual: dict[str, Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.parametrize(
    ("accumulate", "at"),
    [
        (1, 4),  # mid-epoch
        (1, 10),  # the last batch of the first epoch
        (3, 13),  # a window boundary mid-epoch
        (3, 14),  # mid-window: the open window's gradient is in the checkpoint
        (4, 19),  # mid-window, the short last window of an epoch ahead
    ],
)
def test_resume_is_bit_exact(tmp_path: Path, accumulate: int, at: int) -> None:
    whole, resumed, trainer = _interrupted_and_resumed(
        tmp_path, at, accumulate_grad_batches=accumulate
    )
    _assert_equal(whole, resumed)
    assert trainer.current_epoch == 3


def test_resume_from_a_checkpoint_written_at_an_epoch_end(tmp_path: Path) -> None:
    # Written by on_train_epoch_end: the epoch's schedulers have not stepped yet; the
    # resumed fit finishes that bookkeeping and starts the next epoch.
    class EpochScheduled(DropoutNet):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
            return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)

    options = {**bare_trainer_kwargs(), "max_epochs": 3}
    ember.seed_everything(0)
    whole = EpochScheduled()
    Trainer(**options).fit(whole, shuffled())
    ember.seed_everything(0)
    path = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError):
        Trainer(callbacks=[Crash(10, path, "on_train_epoch_end")], **options).fit(
            EpochScheduled(), shuffled()
        )
    assert json.loads((path / "meta.json").read_text())["epoch"] == 0
    ember.seed_everything(5)
    resumed = EpochScheduled()
    trainer = Trainer(**options)
    trainer.fit(resumed, shuffled(), ckpt_path=path)
    _assert_equal(_weights(whole), _weights(resumed))
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [1e-2 * 0.5**3]


def test_resume_with_validation_mid_epoch_and_a_checkpoint_after_it(tmp_path: Path) -> None:
    val = DataLoader(
        TensorDataset(torch.randn(12, 4), torch.randn(12, 1)), batch_size=4, shuffle=True
    )
    whole, resumed, _ = _interrupted_and_resumed(
        tmp_path, 15, "on_validation_end", val=val, val_check_interval=5
    )
    _assert_equal(whole, resumed)


def test_resume_under_fp16_keeps_the_grad_scaler(tmp_path: Path) -> None:
    with warnings.catch_warnings():  # fp16 is emulated on this CPU (warned once)
        warnings.simplefilter("ignore", UserWarning)
        whole, resumed, _ = _interrupted_and_resumed(
            tmp_path, 14, precision="16-mixed", accumulate_grad_batches=3
        )
    _assert_equal(whole, resumed)


def test_resume_with_limit_train_batches(tmp_path: Path) -> None:
    whole, resumed, _ = _interrupted_and_resumed(tmp_path, 5, limit_train_batches=6)
    _assert_equal(whole, resumed)


def test_validation_does_not_move_the_training_random_streams() -> None:
    val = DataLoader(
        TensorDataset(torch.randn(12, 4), torch.randn(12, 1)), batch_size=4, shuffle=True
    )
    options = {**bare_trainer_kwargs(), "max_epochs": 2}
    ember.seed_everything(0)
    without = DropoutNet()
    Trainer(**options).fit(without, shuffled())
    ember.seed_everything(0)
    with_validation = DropoutNet()
    Trainer(val_check_interval=3, **options).fit(with_validation, shuffled(), val)
    _assert_equal(_weights(without), _weights(with_validation))


def test_epoch_metrics_and_progress_continue(tmp_path: Path) -> None:
    options = {**bare_trainer_kwargs(), "max_epochs": 1}
    options.pop("logger")
    ember.seed_everything(0)
    whole = Trainer(**options, logger=MemoryLogger())
    whole.fit(DropoutNet(), shuffled())
    ember.seed_everything(0)
    path = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError):
        Trainer(callbacks=[Crash(4, path)], logger=False, **options).fit(DropoutNet(), shuffled())
    resumed = Trainer(**options, logger=MemoryLogger())
    resumed.fit(DropoutNet(), shuffled(), ckpt_path=path)
    # The epoch mean covers the batches before and after the interruption.
    expected = whole.callback_metrics["train_loss_epoch"]
    assert resumed.callback_metrics["train_loss_epoch"] == pytest.approx(expected, rel=1e-12)
    assert resumed.global_step == whole.global_step == 10


def test_the_checkpoint_layout(tmp_path: Path) -> None:
    trainer = Trainer(**bare_trainer_kwargs(), max_steps=3)
    module = DropoutNet(hidden=8)
    trainer.fit(module, shuffled())
    path = trainer.save_checkpoint(tmp_path / "checkpoint")
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    _assert_equal(_weights(module), weights)
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["hparams"] == {"hidden": 8, "lr": 1e-2}
    assert state["loop"]["global_step"] == 3
    assert "stage" not in state["loop"]  # transient flags are not saved
    assert len(state["ranks"]) == 1 and set(state["ranks"][0]["rng"]) >= {"python", "torch"}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 3 and meta["ember_version"] == ember.__version__
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_module_argument_is_left_out_of_hparams_with_a_warning(tmp_path: Path) -> None:
    class WithModule(TinyModule):
        def __init__(self, head: nn.Module, features: int = 4) -> None:
            super().__init__(features)
            self.save_hyperparameters()
            self.head = head

    trainer = Trainer(**bare_trainer_kwargs(), max_steps=1)
    trainer.fit(WithModule(nn.Linear(1, 1)), loader(16))
    with pytest.warns(UserWarning, match="hparams\\['head'\\] is an nn.Module"):
        path = trainer.save_checkpoint(tmp_path / "checkpoint")
    assert torch.load(path / "state.pt", weights_only=True)["hparams"] == {"features": 4}


def test_a_state_that_cannot_be_saved_fails_before_anything_is_written(tmp_path: Path) -> None:
    class Holding(Callback):
        def state_dict(self) -> dict[str, Any]:
            return {"fn": lambda: 1}

    trainer = Trainer(**bare_trainer_kwargs(), max_steps=1, callbacks=[Holding()])
    trainer.fit(TinyModule(), loader(16))
    with pytest.raises(
        CheckpointError, match=r"state\['callbacks'\]\[.*Holding'\]\['fn'\] is a function"
    ):
        trainer.save_checkpoint(tmp_path / "checkpoint")
    assert list(tmp_path.iterdir()) == []


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path: Path) -> None:
    trainer = Trainer(**bare_trainer_kwargs(), max_steps=1)
    trainer.fit(TinyModule(), loader(16))
    path = trainer.save_checkpoint(tmp_path / "checkpoint")
    trainer.fit(TinyModule(), loader(16))
    trainer.save_checkpoint(path)
    assert json.loads((path / "meta.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# --- bad checkpoints: CheckpointError naming the path and the problem, nothing changed --------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    trainer = Trainer(**bare_trainer_kwargs(), max_steps=2)
    trainer.fit(TinyModule(), loader(16))
    return trainer.save_checkpoint(tmp_path / "good")


class Untouched(TinyModule):
    calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        Untouched.calls += 1
        return super().training_step(batch, batch_idx)


def _damage(path: Path, how: str) -> Path:
    if how == "missing state":
        (path / "state.pt").unlink()
    elif how == "truncated weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "corrupt state":
        (path / "state.pt").write_bytes(b"not a torch file")
    elif how == "a file":
        path = path / "meta.json"
    elif how == "nowhere":
        path = path.parent / "nothing-here"
    elif how == "leftover":
        leftover = path.parent / ".tmp-last-step=2-999"
        path.rename(leftover)
        path = leftover
    return path


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing state", "state.pt is missing"),
        ("truncated weights", "model.safetensors' is truncated or corrupt"),
        ("corrupt state", "state.pt' is truncated or corrupt"),
        ("a file", "is a file, not an ember checkpoint"),
        ("nowhere", "does not exist"),
        ("leftover", "leftover of an interrupted save"),
    ],
)
def test_a_bad_checkpoint_is_refused_before_anything_changes(
    saved: Path, how: str, message: str
) -> None:
    path = _damage(saved, how)
    module = Untouched()
    before = _weights(module)
    Untouched.calls = 0
    with pytest.raises(CheckpointError, match=message) as error:
        Trainer(**bare_trainer_kwargs(), max_epochs=1).fit(module, loader(16), ckpt_path=path)
    assert str(path) in str(error.value)
    assert Untouched.calls == 0
    _assert_equal(before, _weights(module))


def test_a_checkpoint_of_another_module_lists_the_keys(saved: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"missing keys \['net.0.bias'.*unexpected keys \['net.bias'"
    ):
        Trainer(**bare_trainer_kwargs(), max_epochs=1).fit(
            TinyModule(hidden=3), loader(16), ckpt_path=saved
        )


def test_a_weights_only_checkpoint_cannot_continue_fit(tmp_path: Path) -> None:
    trainer = Trainer(**bare_trainer_kwargs(), max_steps=2)
    trainer.fit(TinyModule(), loader(16))
    path = trainer.save_checkpoint(tmp_path / "weights", weights_only=True)
    assert "optimizers" not in torch.load(path / "state.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="save_weights_only=True"):
        Trainer(**bare_trainer_kwargs(), max_steps=4).fit(TinyModule(), loader(16), ckpt_path=path)


def test_validate_and_test_load_the_weights(saved: Path) -> None:
    from safetensors.torch import load_file

    expected = load_file(str(saved / "model.safetensors"))
    module = TinyModule(lr=0.5)
    assert not torch.equal(module.net.weight, expected["net.weight"])
    trainer = Trainer(**bare_trainer_kwargs())
    trainer.validate(module, loader(16), ckpt_path=saved)
    assert torch.equal(module.net.weight, expected["net.weight"])
    other = TinyModule(hidden=3)
    with pytest.raises(CheckpointError, match="missing keys"):
        trainer.test(other, loader(16), ckpt_path=saved)


def test_last_without_a_checkpoint_starts_fresh_with_a_warning() -> None:
    trainer = Trainer(**bare_trainer_kwargs(), max_steps=2)
    with pytest.warns(UserWarning, match="no complete 'last' checkpoint"):
        trainer.fit(TinyModule(), loader(16), ckpt_path="last")
    assert trainer.global_step == 2


def test_a_fit_stopped_by_max_steps_mid_epoch_continues_at_the_next_batch(tmp_path: Path) -> None:
    # SPEC: a stop mid-epoch runs the epoch-end bookkeeping, but the saved progress keeps the
    # batch position; a checkpoint written then resumes that epoch at the next batch.
    options = {**bare_trainer_kwargs(), "accumulate_grad_batches": 2}
    ember.seed_everything(0)
    whole = DropoutNet()
    Trainer(max_steps=12, **options).fit(whole, shuffled())
    ember.seed_everything(0)
    first = Trainer(max_steps=7, **options)  # epoch 1, batch 4 (5 steps per epoch)
    first.fit(DropoutNet(), shuffled())
    assert (first.current_epoch, first.state.batch_idx) == (1, 4)
    path = first.save_checkpoint(tmp_path / "stopped")
    ember.seed_everything(3)
    resumed = DropoutNet()
    Trainer(max_steps=12, **options).fit(resumed, shuffled(), ckpt_path=path)
    _assert_equal(_weights(whole), _weights(resumed))


def test_early_stopping_state_survives_a_resume(tmp_path: Path) -> None:
    from ember.callbacks import EarlyStopping

    class Worsening(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("score", float(self.current_epoch))  # gets worse every epoch

    def trainer(epochs: int, stopping: EarlyStopping) -> Trainer:
        return Trainer(
            **bare_trainer_kwargs(), max_epochs=epochs, callbacks=[stopping], num_sanity_val_steps=0
        )

    first_stopping = EarlyStopping("score", patience=3)
    first = trainer(2, first_stopping)
    first.fit(Worsening(), loader(16), loader(8))
    path = first.save_checkpoint(tmp_path / "checkpoint")
    assert first_stopping.wait_count == 1
    stopping = EarlyStopping("score", patience=3)
    resumed = trainer(10, stopping)
    resumed.fit(Worsening(), loader(16), loader(8), ckpt_path=path)
    # Patience 3 counted from the best (epoch 0) across the resume: stops after epoch 3.
    assert stopping.stopped_epoch == 3 and resumed.current_epoch == 4


def test_an_exception_calls_on_exception_and_leaves_earlier_checkpoints(tmp_path: Path) -> None:
    from ember.callbacks import ModelCheckpoint

    seen: list[BaseException] = []

    class Failing(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.current_epoch == 2:
                raise ValueError("boom")
            return super().training_step(batch, batch_idx)

        def on_exception(self, exception: BaseException) -> None:
            seen.append(exception)

    checkpoint = ModelCheckpoint(save_last=True)
    trainer = Trainer(
        max_epochs=5,
        callbacks=[checkpoint],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match="boom"):
        trainer.fit(Failing(), loader(16))
    assert [type(error) for error in seen] == [ValueError]
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=4", "last-step=4"]
    resumed = Trainer(**bare_trainer_kwargs(), max_epochs=2)
    resumed.fit(TinyModule(), loader(16), ckpt_path=folder / "last-step=4")
    assert resumed.global_step == 4  # nothing left to train: the checkpoint is complete


def test_loggers_continue_the_run_with_monotonic_steps(tmp_path: Path) -> None:
    import csv

    from ember.loggers import CSVLogger

    options = {
        "max_epochs": 2,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "log_every_n_steps": 1,
    }
    ember.seed_everything(0)
    path = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError):
        Trainer(logger=CSVLogger(tmp_path / "logs"), callbacks=[Crash(13, path)], **options).fit(
            DropoutNet(), shuffled()
        )
    # The crashed run logged steps 1..13 (the crash came after batch 13's flush).
    resumed = Trainer(logger=CSVLogger(tmp_path / "logs"), **options)
    resumed.fit(DropoutNet(), shuffled(), ckpt_path=path)
    folders = sorted(p.name for p in (tmp_path / "logs" / "ember").iterdir())
    assert folders == ["version_0"]  # the same run, not a new version
    with open(tmp_path / "logs" / "ember" / "version_0" / "metrics.csv") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row["train_loss_step"]]
    assert steps == list(range(1, 21))  # each step once, in order


class TwoOptimizers(TrainModule):
    """Manual optimization: two optimizers, their schedulers stepped by the module."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        self.b = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        first, second = self.optimizers()
        loss = ((self.a(x) - y) ** 2).mean()
        self.manual_backward(loss)
        first.step()
        first.zero_grad()
        loss = ((self.b(x) + self.a(x).detach() - y) ** 2).mean()
        self.manual_backward(loss)
        second.step()
        second.zero_grad()
        self.lr_schedulers()[0].step()

    def configure_optimizers(self) -> Any:
        first = torch.optim.Adam(self.a.parameters(), 1e-2)
        second = torch.optim.SGD(self.b.parameters(), 0.1, momentum=0.9)
        schedulers = [
            torch.optim.lr_scheduler.StepLR(first, 3, 0.5),
            torch.optim.lr_scheduler.StepLR(second, 3, 0.5),
        ]
        return [first, second], schedulers


@pytest.mark.parametrize(("accumulate", "at"), [(1, 7), (3, 14)])
def test_manual_optimization_resumes_exactly(tmp_path: Path, accumulate: int, at: int) -> None:
    options = {**bare_trainer_kwargs(), "max_epochs": 3, "accumulate_grad_batches": accumulate}
    ember.seed_everything(0)
    whole = TwoOptimizers()
    Trainer(**options).fit(whole, shuffled())
    ember.seed_everything(0)
    path = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError):
        Trainer(callbacks=[Crash(at, path)], **options).fit(TwoOptimizers(), shuffled())
    ember.seed_everything(5)
    resumed = TwoOptimizers()
    Trainer(**options).fit(resumed, shuffled(), ckpt_path=path)
    _assert_equal(_weights(whole), _weights(resumed))


# --- regressions found in review --------------------------------------------------------------
def _resumed_equals_whole(
    tmp_path: Path,
    make_module: Any,
    make_loader: Any,
    at: int,
    event: str = "on_train_batch_end",
    val: Any = None,
    **options: Any,
) -> None:
    options = {**bare_trainer_kwargs(), **options}
    ember.seed_everything(0)
    whole = make_module()
    Trainer(**options).fit(whole, make_loader(), val() if val else None)
    ember.seed_everything(0)
    path = tmp_path / f"checkpoint-{at}-{event}"
    with pytest.raises(RuntimeError):
        Trainer(callbacks=[Crash(at, path, event)], **options).fit(
            make_module(), make_loader(), val() if val else None
        )
    ember.seed_everything(77)
    resumed = make_module()
    Trainer(**options).fit(resumed, make_loader(), val() if val else None, ckpt_path=path)
    _assert_equal(_weights(whole), _weights(resumed))


@pytest.mark.parametrize(("at", "event"), [(3, "on_train_batch_end"), (9, "on_train_epoch_end")])
def test_a_loader_with_its_own_generator_resumes_exactly(
    tmp_path: Path, at: int, event: str
) -> None:
    def make_loader() -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(70, 4, generator=generator), torch.randn(70, 1, generator=generator)
        )
        return DataLoader(
            data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
        )

    _resumed_equals_whole(tmp_path, DropoutNet, make_loader, at, event, max_epochs=3)


class ManualAccumulation(DropoutNet):
    """Lightning's manual accumulation recipe: a gradient carried over two batches."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        self.manual_backward(super().training_step(batch, batch_idx) / 2)
        if batch_idx % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("at", [3, 14])
def test_manual_optimization_keeps_a_gradient_carried_between_batches(
    tmp_path: Path, at: int
) -> None:
    _resumed_equals_whole(tmp_path, ManualAccumulation, shuffled, at, max_epochs=2)


class Plateau(DropoutNet):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"},
        }


def _val() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(12, 4, generator=generator), torch.randn(12, 1, generator=generator)
    )
    return DataLoader(data, batch_size=4)


@pytest.mark.parametrize(
    ("at", "event"),
    [(10, "on_train_epoch_end"), (20, "on_validation_start"), (5, "on_train_batch_end")],
)
def test_a_plateau_scheduler_on_a_validation_metric_resumes_exactly(
    tmp_path: Path, at: int, event: str
) -> None:
    _resumed_equals_whole(
        tmp_path,
        Plateau,
        shuffled,
        at,
        event,
        val=_val,
        max_epochs=3,
        val_check_interval=5,
        num_sanity_val_steps=0,
    )


def test_a_resume_preempted_before_its_first_batch_keeps_the_checkpoint_exact(
    tmp_path: Path,
) -> None:
    import os
    import signal

    from ember.callbacks import ModelCheckpoint

    class TermAtTrainStart(Callback):
        def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    def trainer(*callbacks: Callback) -> Trainer:
        return Trainer(
            max_epochs=2,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            callbacks=[ModelCheckpoint(every_n_train_steps=4, save_last=True), *callbacks],
        )

    ember.seed_everything(0)
    whole = DropoutNet()
    Trainer(**bare_trainer_kwargs(), max_epochs=2).fit(whole, shuffled())
    ember.seed_everything(0)
    with pytest.raises(SystemExit):  # interrupted at step 4 (epoch 0, batch 4)
        trainer(SendSignalAt(4)).fit(DropoutNet(), shuffled())
    ember.seed_everything(1)
    with pytest.raises(SystemExit, match="at global step 4"):  # resumed, then preempted at once
        trainer(TermAtTrainStart()).fit(DropoutNet(), shuffled(), ckpt_path="last")
    ember.seed_everything(2)
    resumed = DropoutNet()
    trainer().fit(resumed, shuffled(), ckpt_path="last")
    _assert_equal(_weights(whole), _weights(resumed))


class SendSignalAt(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        import os
        import signal

        if trainer.state.total_batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_weights_of_other_shapes_are_refused_before_anything_changes(saved: Path) -> None:
    class Wider(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2)

    module = Wider()
    before = _weights(module)
    with pytest.raises(CheckpointError, match=r"other shapes \(net.weight: \(1, 4\) here \(2, 4\)"):
        Trainer(**bare_trainer_kwargs(), max_epochs=1).fit(module, loader(16), ckpt_path=saved)
    with pytest.raises(CheckpointError, match="other shapes"):
        Trainer(**bare_trainer_kwargs()).validate(module, loader(16), ckpt_path=saved)
    _assert_equal(before, _weights(module))


def test_an_accelerator_state_directory_is_not_a_trainer_checkpoint(tmp_path: Path) -> None:
    from ember import Accelerator

    accelerator = Accelerator(cpu=True)
    module = TinyModule()
    optimizer = module.configure_optimizers()
    accelerator.prepare(module, optimizer)
    path = accelerator.save_state(tmp_path / "state")
    with pytest.raises(CheckpointError, match="written by Accelerator.save_state"):
        Trainer(**bare_trainer_kwargs(), max_epochs=1).fit(TinyModule(), loader(16), ckpt_path=path)


def test_an_interrupted_overwrite_gives_the_old_checkpoint_back(saved: Path) -> None:
    from ember.checkpoint.files import complete_checkpoints, remove_leftovers

    aside = saved.with_name(f".tmp-old-{saved.name}-12345")
    saved.rename(aside)  # a crash between the two renames of an overwrite
    remove_leftovers(saved.parent)
    assert complete_checkpoints(saved.parent) == [saved]


def test_a_stop_held_off_by_min_steps_survives_a_resume(tmp_path: Path) -> None:
    from ember.callbacks import EarlyStopping

    class Worse(DropoutNet):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("worse", float(self.global_step))

    options = {**bare_trainer_kwargs(), "max_epochs": 6, "min_steps": 25, "num_sanity_val_steps": 0}

    def stopping() -> list[Callback]:
        return [EarlyStopping("worse", patience=1)]

    ember.seed_everything(0)
    whole = Worse()
    whole_trainer = Trainer(callbacks=stopping(), **options)
    whole_trainer.fit(whole, shuffled(), _val())
    ember.seed_everything(0)
    path = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError):  # after the stop was asked (step 20), before step 25
        Trainer(callbacks=[*stopping(), Crash(22, path)], **options).fit(
            Worse(), shuffled(), _val()
        )
    ember.seed_everything(5)
    resumed = Worse()
    trainer = Trainer(callbacks=stopping(), **options)
    trainer.fit(resumed, shuffled(), _val(), ckpt_path=path)
    assert trainer.global_step == whole_trainer.global_step == 25
    _assert_equal(_weights(whole), _weights(resumed))


@pytest.mark.parametrize(("at", "event"), [(5, "on_validation_end"), (6, "on_train_batch_end")])
def test_a_resumed_run_logs_each_step_once(tmp_path: Path, at: int, event: str) -> None:
    import csv

    from ember.loggers import CSVLogger

    options = {
        "max_epochs": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "log_every_n_steps": 3,
        "accumulate_grad_batches": 2,
        "val_check_interval": 5,
        "num_sanity_val_steps": 0,
    }

    def rows(root: Path) -> list[tuple[str, ...]]:
        with open(root / "ember" / "version_0" / "metrics.csv") as file:
            return [
                tuple(f"{key}={value}" for key, value in row.items() if value)
                for row in csv.DictReader(file)
            ]

    ember.seed_everything(0)
    Trainer(logger=CSVLogger(tmp_path / "whole"), **options).fit(DropoutNet(), shuffled(), _val())
    ember.seed_everything(0)
    path = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError):
        Trainer(
            logger=CSVLogger(tmp_path / "run"), callbacks=[Crash(at, path, event)], **options
        ).fit(DropoutNet(), shuffled(), _val())
    ember.seed_everything(3)
    Trainer(logger=CSVLogger(tmp_path / "run"), **options).fit(
        DropoutNet(), shuffled(), _val(), ckpt_path=path
    )
    assert rows(tmp_path / "run") == rows(tmp_path / "whole")
