"""Clipping at step time, a fresh second fit, precision precedence and compiled steps."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ember import Callback, MisconfigurationError, Trainer, TrainModule
from ember.callbacks import EarlyStopping
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


# --- B1: clipping reads the optimizer's param_groups at step time -------------------------------
class UnfreezeLater(TrainModule):
    """Two layers; the second is frozen until epoch 1 starts (and is in the optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 1)
        self.second.requires_grad_(False)
        self.norms_before_step: list[tuple[int, float, float]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        # A large loss: gradients far above the clip value.
        return 100.0 * nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.second.requires_grad_(True)


class RecordNorms(Callback):
    """The gradient norms before clipping (on_before_optimizer_step runs before it)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, float, float]] = []

    def on_before_optimizer_step(self, trainer: Trainer, module: Any, optimizer: Any) -> None:
        grads = [p for group in optimizer.param_groups for p in group["params"]]
        total = float(torch.nn.utils.get_total_norm([p.grad for p in grads if p.grad is not None]))
        second = module.second.weight.grad
        trainer_second = float(second.norm()) if second is not None else 0.0
        self.records.append((trainer.current_epoch, total, trainer_second))


def fit_recording_step_norms(trainer: Trainer, module: TrainModule) -> list[tuple[int, float]]:
    """Fit, recording (epoch, total gradient norm) inside every real ``SGD.step``: the
    gradient the step applies, after the Trainer's clipping."""
    seen: list[tuple[int, float]] = []
    original_step = torch.optim.SGD.step

    def recording_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        seen.append((trainer.current_epoch, float(torch.nn.utils.get_total_norm(grads))))
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", recording_step)
        trainer.fit(module, loader(32, batch_size=8))
    return seen


def test_clipping_covers_a_layer_unfrozen_after_fit_started() -> None:
    recorder = RecordNorms()
    module = UnfreezeLater()
    trainer = Trainer(
        max_epochs=2, gradient_clip_val=0.01, callbacks=[recorder], **bare_trainer_kwargs()
    )
    # Clipping runs after on_before_optimizer_step (as in Lightning): measure what step() uses.
    seen = fit_recording_step_norms(trainer, module)
    epoch_one = [norm for epoch, norm in seen if epoch == 1]
    assert epoch_one and all(norm <= 0.01 * (1 + 1e-4) for norm in epoch_one)
    # The unfrozen layer really has a gradient in epoch 1, far above the clip value unclipped.
    assert any(second > 0 for epoch, _, second in recorder.records if epoch == 1)
    assert max(total for epoch, total, _ in recorder.records if epoch == 1) > 0.01


def test_clipping_covers_a_param_group_added_after_fit_started() -> None:
    class AddGroupLater(UnfreezeLater):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.first.parameters(), lr=1e-3)

        def on_train_epoch_start(self) -> None:
            if self.current_epoch == 1:
                self.second.requires_grad_(True)
                self.trainer.optimizers[0].add_param_group({"params": self.second.parameters()})

    module = AddGroupLater()
    trainer = Trainer(max_epochs=2, gradient_clip_val=0.01, **bare_trainer_kwargs())
    seen = fit_recording_step_norms(trainer, module)
    assert len(trainer.optimizers[0].param_groups) == 2
    assert all(norm <= 0.01 * (1 + 1e-4) for _, norm in seen)


def test_clipping_matches_plain_clip_grad_norm() -> None:
    """With everything trainable, the Trainer's clipping equals torch's clip_grad_norm_."""

    class Clipped(UnfreezeLater):
        def __init__(self) -> None:
            super().__init__()
            self.second.requires_grad_(True)

    module = Clipped()
    reference = copy.deepcopy(module)
    Trainer(max_epochs=1, gradient_clip_val=0.5, **bare_trainer_kwargs()).fit(
        module, loader(32, batch_size=8)
    )
    optimizer = torch.optim.SGD(reference.parameters(), lr=1e-3)
    for batch_idx, batch in enumerate(loader(32, batch_size=8)):
        reference.training_step(batch, batch_idx).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


# --- B3: gradient_clip_val=0 means no clipping ---------------------------------------------------
def test_gradient_clip_val_zero_means_no_clipping() -> None:
    clipped_zero = TinyModule()
    unclipped = TinyModule()
    Trainer(max_epochs=1, gradient_clip_val=0, **bare_trainer_kwargs()).fit(
        clipped_zero, loader(32)
    )
    Trainer(max_epochs=1, **bare_trainer_kwargs()).fit(unclipped, loader(32))
    assert not torch.equal(clipped_zero.net.weight, TinyModule().net.weight)  # it trained
    torch.testing.assert_close(clipped_zero.net.weight, unclipped.net.weight)
    assert Trainer(gradient_clip_val=0, **bare_trainer_kwargs()).gradient_clip_val is None


# --- B2: a second fit starts with empty metrics ------------------------------------------------
class NoValidationLogging(TinyModule):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("other_metric", nn.functional.mse_loss(self(x), y))


def test_a_second_fit_starts_with_empty_metrics() -> None:
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=0, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(32), loader(16))
    assert "val_loss" in trainer.callback_metrics
    assert "val_loss" in trainer.logged_metrics

    seen_at_start: list[dict[str, float]] = []

    class Snapshot(Callback):
        def on_fit_start(self, trainer: Trainer, module: Any) -> None:
            seen_at_start.append(dict(trainer.callback_metrics))
            seen_at_start.append(dict(trainer.logged_metrics))

    trainer.callbacks.append(Snapshot())
    trainer.fit(NoValidationLogging(), loader(32), loader(16))
    assert seen_at_start == [{}, {}]
    assert "val_loss" not in trainer.callback_metrics
    assert "val_loss" not in trainer.logged_metrics


def test_early_stopping_in_a_second_fit_does_not_read_a_stale_value() -> None:
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=0, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(32), loader(16))
    trainer.callbacks.append(EarlyStopping(monitor="val_loss"))
    with pytest.raises(MisconfigurationError, match="val_loss"):
        trainer.fit(NoValidationLogging(), loader(32), loader(16))


# --- C1: precision follows argument > EMBER_MIXED_PRECISION > config file > "32-true" ------------
def test_precision_defaults_to_32_true() -> None:
    assert Trainer(**bare_trainer_kwargs()).accelerator.precision.name == "32-true"


def test_precision_follows_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "bf16")
    assert Trainer(**bare_trainer_kwargs()).accelerator.precision.name == "bf16-mixed"
    # The argument wins over the variable.
    trainer = Trainer(precision="32-true", **bare_trainer_kwargs())
    assert trainer.accelerator.precision.name == "32-true"


def test_precision_follows_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "custom_config.yaml"
    config.write_text("mixed_precision: bf16\n")
    monkeypatch.setenv("EMBER_CONFIG_FILE", str(config))
    assert Trainer(**bare_trainer_kwargs()).accelerator.precision.name == "bf16-mixed"
    # The variable wins over the file, the argument over both.
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "no")
    assert Trainer(**bare_trainer_kwargs()).accelerator.precision.name == "32-true"
    trainer = Trainer(precision="bf16-true", **bare_trainer_kwargs())
    assert trainer.accelerator.precision.name == "bf16-true"


def test_a_bad_precision_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "fp8")
    with pytest.raises(MisconfigurationError, match="EMBER_MIXED_PRECISION"):
        Trainer(**bare_trainer_kwargs())
    with pytest.raises(MisconfigurationError, match="precision"):
        Trainer(precision="fp8", **bare_trainer_kwargs())


# --- C2: compile compiles the steps the loop runs ------------------------------------------------
class CountingBackend:
    """A torch.compile backend that records the graphs it receives and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(graph)
        return graph.forward

    def code(self) -> str:
        return "\n".join(graph.code for graph in self.graphs)


class NoForwardModule(TrainModule):
    """Like the README's quick start: training_step never calls self(...)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_compiles_a_training_step_that_does_not_call_forward() -> None:
    backend = CountingBackend()
    module = NoForwardModule()
    reference = copy.deepcopy(module)
    trainer = Trainer(max_epochs=1, compile={"backend": backend}, **bare_trainer_kwargs())
    trainer.fit(module, loader(32, batch_size=8))
    assert backend.graphs, "the training step was never compiled"
    assert "mse_loss" in backend.code()
    Trainer(max_epochs=1, **bare_trainer_kwargs()).fit(reference, loader(32, batch_size=8))
    torch.testing.assert_close(module.layer.weight, reference.layer.weight)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_compiles_every_step_the_loops_run() -> None:
    backend = CountingBackend()
    module = TinyModule()
    trainer = Trainer(
        max_epochs=1, num_sanity_val_steps=0, compile={"backend": backend}, **bare_trainer_kwargs()
    )
    trainer.fit(module, loader(32), loader(16))
    after_fit = len(backend.graphs)
    assert after_fit >= 2  # training_step and validation_step
    trainer.test(module, loader(16))
    assert len(backend.graphs) > after_fit
    before_predict = len(backend.graphs)
    outputs = trainer.predict(module, loader(16))
    assert len(backend.graphs) > before_predict
    assert len(outputs) == 2


def test_a_step_that_cannot_be_compiled_is_named_in_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(function: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", refuse)
    module = TinyModule()
    trainer = Trainer(max_epochs=1, compile=True, **bare_trainer_kwargs())
    with pytest.warns(UserWarning) as caught:
        trainer.fit(module, loader(32))
    messages = [str(warning.message) for warning in caught]
    for step in ("training_step", "validation_step"):  # the steps fit runs
        assert any(f"TinyModule.{step}" in m and "runs uncompiled" in m for m in messages)
    assert trainer.global_step == 4  # it trained, uncompiled


def test_step_schedulers_advance_after_a_step_the_fp16_scaler_skipped() -> None:
    """SPEC §4: a window that ends with step() called counts as a step even when the grad
    scaler skipped it: the Trainer's schedulers advance too (as in Lightning)."""

    class Overflowing(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            return loss * (1e35 if batch_idx == 0 else 1.0)  # finite loss, inf scaled grads

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

    trainer = Trainer(max_steps=3, precision="16-mixed", accelerator="cpu", **bare_trainer_kwargs())
    trainer.fit(Overflowing(), loader())
    assert trainer.global_step == 3
    assert trainer.accelerator.optimizer_step.steps_taken == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
