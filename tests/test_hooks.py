"""The exact order of events; docs/hooks.md documents the same order."""

from __future__ import annotations

import inspect
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch

from ember import Callback, Trainer
from ember.hooks import EVENTS, TRANSFER_HOOKS, ModuleHooks
from ember.hooks import Callback as BaseCallback
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


def _recorder(events: list[str], prefix: str) -> Any:
    def make(name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            events.append(f"{prefix}{name}")

        return record

    return make


class RecordingCallback(Callback):
    """A callback that records every event it receives."""

    def __init__(self, events: list[str]) -> None:
        self.events = events


class RecordingModule(TinyModule):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.events.append("training_step")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.events.append("validation_step")
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.events.append("test_step")
        super().test_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        self.events.append("predict_step")
        return super().predict_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        self.events.append("configure_optimizers")
        return super().configure_optimizers()


for _event in EVENTS:
    setattr(
        RecordingCallback,
        _event,
        (lambda name: lambda self, *args: self.events.append(f"Callback.{name}"))(_event),
    )
    setattr(
        RecordingModule,
        _event,
        (lambda name: lambda self, *args: self.events.append(name))(_event),
    )


def _both(name: str) -> list[str]:
    return [f"Callback.{name}", name]


def recorded_order(name: str) -> list[str]:
    """The order in ``docs/snippets/hooks_<name>.txt``, which docs/hooks.md includes: one
    name a line (``#`` starts a comment); an event fires on every callback, then on the
    module (``Callback.<event>``, ``<event>``); any other name is a module method."""
    order: list[str] = []
    for line in (_docs_path().parent / "snippets" / f"hooks_{name}.txt").read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            order += _both(entry) if entry in EVENTS else [entry]
    return order


def test_fit_event_order() -> None:
    events: list[str] = []
    trainer = Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        num_sanity_val_steps=1,
        callbacks=[RecordingCallback(events)],
        **bare_trainer_kwargs(),
    )
    trainer.fit(RecordingModule(events), loader(24, batch_size=8), loader(16, batch_size=8))
    assert events == recorded_order("fit")


def test_checkpoint_writers_run_last_and_monitors_after_the_module_at_epoch_end() -> None:
    events: list[str] = []

    def recording(name: str, **flags: bool) -> Callback:
        def record(self: Any, *args: Any) -> None:
            events.append(name)

        methods = {event: record for event in ("on_validation_end", "on_train_epoch_end")}
        return type(name, (Callback,), {**methods, **flags})()

    class Module(TinyModule):
        def on_validation_end(self) -> None:
            events.append("module")

        def on_train_epoch_end(self) -> None:
            events.append("module")

    plain = recording("Plain")
    plain.monitors = True  # an instance attribute changes nothing: the class decides
    callbacks = [
        recording("Writer", writes_checkpoints=True),
        recording("Monitor", monitors=True),
        plain,
    ]
    kwargs = {**bare_trainer_kwargs(), "enable_checkpointing": True}  # Writer is the one
    trainer = Trainer(max_epochs=1, callbacks=callbacks, num_sanity_val_steps=0, **kwargs)
    trainer.fit(Module(), loader(8, batch_size=8), loader(8, batch_size=8))
    # on_validation_end: the given order, writers last, then the module; on_train_epoch_end:
    # the other callbacks, the module, then monitors, writers last.
    at_validation_end = ["Monitor", "Plain", "Writer", "module"]
    at_train_epoch_end = ["Plain", "module", "Monitor", "Writer"]
    assert events == at_validation_end + at_train_epoch_end


def test_the_built_in_monitors_and_writers_are_marked() -> None:
    from ember.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    assert EarlyStopping.monitors and not EarlyStopping.writes_checkpoints
    assert ModelCheckpoint.monitors and ModelCheckpoint.writes_checkpoints
    assert not LearningRateMonitor.monitors and not BaseCallback.writes_checkpoints


def test_a_checkpoint_holds_the_other_callbacks_state_of_its_step(tmp_path: Path) -> None:
    from ember.callbacks import EarlyStopping, ModelCheckpoint
    from ember.checkpoint.files import read_checkpoint

    class Worsening(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", torch.tensor(float(self.current_epoch)))

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    stopping = EarlyStopping("val_loss", patience=10)
    trainer = Trainer(
        max_epochs=3,
        callbacks=[checkpoint, stopping],  # given first, still runs after EarlyStopping
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(Worsening(), loader(8, batch_size=8), loader(8, batch_size=8))
    waits = [
        read_checkpoint(path, weights=False).state["callbacks"][stopping.state_key]["wait_count"]
        for path in checkpoint.best_k_models
    ]
    assert waits == [0, 1, 2]


def test_validate_test_predict_event_order() -> None:
    events: list[str] = []
    trainer = Trainer(callbacks=[RecordingCallback(events)], **bare_trainer_kwargs())
    module = RecordingModule(events)
    for name, run in (
        ("validate", trainer.validate),
        ("test", trainer.test),
        ("predict", trainer.predict),
    ):
        events.clear()
        run(module, loader(8, batch_size=8))
        assert events == recorded_order(name), name


def _pseudocode(section: str) -> list[str]:
    """The names in the first ``text`` block under ``## <section>`` of docs/hooks.md."""
    page = _docs_path().read_text()
    start = page.index(f"## {section}\n")
    block = page[
        page.index("```text\n", start) : page.index("```\n", page.index("```text\n", start) + 8)
    ]
    return re.findall(r"\b((?:on_|setup|teardown|configure_optimizers|[a-z]+_step)\w*)\(?", block)


@pytest.mark.parametrize(
    ("section", "name"),
    [
        ("fit", "fit"),
        ("validation run (inside fit, or `Trainer.validate`)", "validate"),
        ("test (`Trainer.test`)", "test"),
        ("predict (`Trainer.predict`)", "predict"),
    ],
)
def test_the_pseudocode_of_docs_hooks_follows_the_recorded_order(section: str, name: str) -> None:
    """The page's loop pseudocode agrees with the recorded order: of the names it writes,
    each one written after another follows it directly somewhere in the recording (moving a
    line of the pseudocode, or of the recording, fails here)."""
    written = _pseudocode(section)
    assert len(written) >= 8, written
    recorded = [
        event
        for event in recorded_order(name)
        if not event.startswith("Callback.") and event in written
    ]
    recorded_pairs = set(pairwise(recorded))
    for pair in pairwise(written):
        assert pair in recorded_pairs, f"{pair} is not the recorded order ({section})"


def test_exception_fires_on_exception_then_teardown() -> None:
    events: list[str] = []

    class Failing(RecordingModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            raise RuntimeError("boom")

    trainer = Trainer(max_epochs=1, callbacks=[RecordingCallback(events)], **bare_trainer_kwargs())
    try:
        trainer.fit(Failing(events), loader(8, batch_size=8))
    except RuntimeError as error:
        assert str(error) == "boom"
    else:  # pragma: no cover
        raise AssertionError("fit should have raised")
    assert events[-4:] == _both("on_exception") + _both("teardown")


def test_every_event_has_matching_noops_on_both_bases() -> None:
    """Callback.<event>(self, trainer, module, *args) mirrors ModuleHooks.<event>(self, *args),
    both do nothing, and docs/hooks.md names the event."""
    documented = _docs_path().read_text()
    for event in EVENTS:
        callback_params = list(inspect.signature(getattr(BaseCallback, event)).parameters)
        module_params = list(inspect.signature(getattr(ModuleHooks, event)).parameters)
        assert callback_params[:3] == ["self", "trainer", "module"], event
        assert callback_params[3:] == module_params[1:], event
        assert f"`{event}" in documented, f"{event} is missing from docs/hooks.md"
    assert {name for name in dir(BaseCallback) if name.startswith("on_")} | {
        "setup",
        "teardown",
    } == set(EVENTS)


def test_dataloader_idx_is_passed_only_with_several_loaders() -> None:
    received: list[tuple[Any, ...]] = []

    class Record(Callback):
        def on_validation_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            received.append(args[3:])  # after outputs, batch, batch_idx

    trainer = Trainer(callbacks=[Record()], **bare_trainer_kwargs())
    trainer.validate(TinyModule(), loader(8, batch_size=8))
    assert received == [()]
    received.clear()
    trainer.validate(TinyModule(), [loader(8, batch_size=8), loader(8, batch_size=8)])
    assert received == [(0,), (1,)]


def test_hooks_receive_their_arguments() -> None:
    seen: dict[str, Any] = {}

    class Inspect(Callback):
        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            seen["outputs"] = outputs
            seen["batch_idx"] = batch_idx
            seen["trainer"] = trainer

        def on_before_backward(self, trainer: Any, module: Any, loss: torch.Tensor) -> None:
            seen["loss_requires_grad"] = loss.requires_grad

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            seen["optimizer"] = optimizer

        def setup(self, trainer: Any, module: Any, stage: str) -> None:
            seen["stage"] = stage

    trainer = Trainer(max_epochs=1, callbacks=[Inspect()], **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(16, batch_size=8))
    assert seen["stage"] == "fit"
    assert seen["batch_idx"] == 1
    assert seen["trainer"] is trainer
    assert isinstance(seen["outputs"], torch.Tensor)
    assert seen["loss_requires_grad"] is True
    assert isinstance(seen["optimizer"], torch.optim.Optimizer)


def _docs_path() -> Path:
    return Path(__file__).resolve().parents[1] / "docs" / "hooks.md"


class TransferRecording(TinyModule):
    """Records each batch-transfer hook and each step with the batch's marks; the hooks
    change the batch, so the steps show they received what the hooks returned."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.events.append(f"on_before_batch_transfer({dataloader_idx})")
        x, y = batch
        return [x, y, "before"]

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        self.events.append(f"transfer_batch_to_device({device.type}, {dataloader_idx})")
        return [*batch, "moved"]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.events.append(f"on_after_batch_transfer({dataloader_idx})")
        return [*batch, "after"]

    def _step(self, name: str, batch: Any) -> None:
        self.events.append(f"{name}{tuple(batch[2:])}")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.events.append("on_train_batch_start")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self._step("training_step", batch)
        return super().training_step(batch[:2], batch_idx)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step("validation_step", batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step("test_step", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        self._step("predict_step", batch)
        return batch[0]


def _transferred(step: str, dataloader_idx: int) -> list[str]:
    return [
        f"on_before_batch_transfer({dataloader_idx})",
        f"transfer_batch_to_device(cpu, {dataloader_idx})",
        f"on_after_batch_transfer({dataloader_idx})",
        f"{step}('before', 'moved', 'after')",
    ]


def test_batch_transfer_hooks_run_in_order_on_every_loader_with_its_index() -> None:
    events: list[str] = []
    module = TransferRecording(events)
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=1, **bare_trainer_kwargs())
    two = [loader(8, batch_size=8), loader(8, batch_size=8)]
    trainer.fit(module, loader(16, batch_size=8), two)
    sanity = _transferred("validation_step", 0) + _transferred("validation_step", 1)
    train_batch = _transferred("training_step", 0)
    train_batch.insert(3, "on_train_batch_start")  # the batch arrives transferred
    validation = _transferred("validation_step", 0) + _transferred("validation_step", 1)
    assert events == sanity + train_batch + train_batch + validation
    for stage, run in (("validation_step", trainer.validate), ("test_step", trainer.test)):
        events.clear()
        run(module, two)
        assert events == _transferred(stage, 0) + _transferred(stage, 1)
    events.clear()
    trainer.predict(module, two)
    assert events == _transferred("predict_step", 0) + _transferred("predict_step", 1)


def test_only_the_overridden_transfer_hooks_run() -> None:
    seen: list[Any] = []

    class AfterOnly(TinyModule):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            x, y = batch
            seen.append((x.device.type, dataloader_idx))
            return [x * 0, y]

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(float(batch[0].abs().sum()))  # the step gets what the hook returned
            return super().training_step(batch, batch_idx)

    Trainer(max_epochs=1, **bare_trainer_kwargs()).fit(AfterOnly(), loader(16, batch_size=8))
    assert seen == [("cpu", 0), 0.0, ("cpu", 0), 0.0]


def test_without_transfer_hooks_the_cpu_loader_does_nothing_per_batch() -> None:
    trainer = Trainer(max_steps=1, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(16, batch_size=8))
    assert trainer.run_context.train_loader is not None
    assert trainer.run_context.train_loader.transfer is None


def test_transfer_hooks_are_documented_module_methods_and_not_callback_events() -> None:
    documented = _docs_path().read_text()
    for name in TRANSFER_HOOKS:
        assert f"`{name}" in documented or f"{name}(" in documented, name
        assert getattr(ModuleHooks, name).__doc__, name
        assert not hasattr(BaseCallback, name) and name not in EVENTS
