"""Run control: accelerator aliases, configure_callbacks, min/max limits, max_time,
estimated_stepping_batches, fast_dev_run, overfit_batches and the model summary."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ember import Callback, MisconfigurationError, Trainer
from ember.callbacks import EarlyStopping
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


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
