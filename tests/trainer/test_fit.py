"""Loop semantics the SPEC pins: steps vs batches, accumulation, clipping, schedulers."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ember import Callback, Trainer
from tests.helpers import TinyModule, bare_trainer_kwargs, loader, regression_data


def _plain_sgd(batches: list[tuple[Tensor, Tensor]], lr: float = 0.1, epochs: int = 1) -> nn.Module:
    """Reference: plain PyTorch, one SGD step per (big) batch, mean squared error."""
    model = TinyModule(lr=lr).net
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    return model


def _big_batches(samples: int, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    data = regression_data(samples)
    x, y = data.tensors
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def _assert_same_weights(module: nn.Module, reference: nn.Module) -> None:
    for (name, got), expected in zip(
        module.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)


def test_accumulation_equals_big_batch_training() -> None:
    module = TinyModule()
    trainer = Trainer(max_epochs=2, accumulate_grad_batches=4, **bare_trainer_kwargs())
    trainer.fit(module, loader(64, batch_size=4))
    assert trainer.global_step == 8  # 16 batches / 4 per step, twice
    _assert_same_weights(module.net, _plain_sgd(_big_batches(64, [16] * 4), epochs=2))


def test_short_last_window_is_divided_by_its_own_size() -> None:
    module = TinyModule()
    trainer = Trainer(max_epochs=1, accumulate_grad_batches=4, **bare_trainer_kwargs())
    trainer.fit(module, loader(40, batch_size=4))  # 10 batches: windows of 4, 4, 2
    assert trainer.global_step == 3
    _assert_same_weights(module.net, _plain_sgd(_big_batches(40, [16, 16, 8])))


def test_limit_train_batches_shortens_the_last_window() -> None:
    module = TinyModule()
    trainer = Trainer(
        max_epochs=1, accumulate_grad_batches=4, limit_train_batches=6, **bare_trainer_kwargs()
    )
    trainer.fit(module, loader(64, batch_size=4))  # 6 batches: windows of 4 and 2
    assert trainer.global_step == 2
    _assert_same_weights(module.net, _plain_sgd(_big_batches(64, [16, 8])))


class SummedLoss(TinyModule):
    """Returns the summed loss and its item count, as token-level training does."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y, reduction="sum")
        return {"loss": loss, "num_items": x.shape[0]}


def test_num_items_normalises_by_the_window_total() -> None:
    x, y = regression_data(32).tensors
    sizes = [3, 5, 1, 7, 6, 2, 4, 4]  # micro-batches of unequal sizes
    micro, start = [], 0
    for size in sizes:
        micro.append((x[start : start + size], y[start : start + size]))
        start += size
    module = SummedLoss()
    trainer = Trainer(max_epochs=1, accumulate_grad_batches=4, **bare_trainer_kwargs())
    trainer.fit(module, micro)  # any iterable with a length is a loader
    assert trainer.global_step == 2
    # One big batch per window, mean over its items: 3+5+1+7 = 16 and 6+2+4+4 = 16.
    _assert_same_weights(module.net, _plain_sgd(_big_batches(32, [16, 16])))


def test_num_items_as_tensor_and_uneven_windows() -> None:
    x, y = regression_data(20).tensors
    sizes = [2, 9, 3, 6]

    class TensorItems(SummedLoss):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            out["num_items"] = torch.tensor(out["num_items"])
            return out

    micro, start = [], 0
    for size in sizes:
        micro.append((x[start : start + size], y[start : start + size]))
        start += size
    module = TensorItems()
    Trainer(max_epochs=1, accumulate_grad_batches=3, **bare_trainer_kwargs()).fit(module, micro)
    # windows: [2, 9, 3] = 14 items, then the short window [6]
    _assert_same_weights(module.net, _plain_sgd(_big_batches(20, [14, 6])))


def test_max_steps_counts_optimizer_steps() -> None:
    seen: list[int] = []

    class Count(Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            seen.append(trainer.global_step)

    trainer = Trainer(
        max_steps=5, accumulate_grad_batches=3, callbacks=[Count()], **bare_trainer_kwargs()
    )
    trainer.fit(TinyModule(), loader(64, batch_size=8))  # 8 batches per epoch
    assert trainer.global_step == 5
    # Epoch 1: windows of 3, 3 and a short 2 (3 steps); epoch 2: 3, 3 (2 steps).
    assert len(seen) == 14
    assert seen == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5]


def test_max_epochs_default_and_should_stop() -> None:
    assert Trainer(**bare_trainer_kwargs()).max_epochs == 1000

    class StopAfterThree(Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                trainer.should_stop = True

    trainer = Trainer(callbacks=[StopAfterThree()], **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(64, batch_size=8))
    assert trainer.global_step == 3


def test_should_stop_waits_for_the_window_to_close() -> None:
    class StopAtOnce(Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            trainer.should_stop = True

    trainer = Trainer(accumulate_grad_batches=3, callbacks=[StopAtOnce()], **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(64, batch_size=8))
    assert trainer.global_step == 1
    assert trainer.state.batch_idx == 3


def test_none_from_training_step_skips_the_batch() -> None:
    class SkipOdd(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx % 2 == 1:
                return None
            return super().training_step(batch, batch_idx)

    module = SkipOdd()
    trainer = Trainer(max_epochs=1, **bare_trainer_kwargs())
    trainer.fit(module, loader(32, batch_size=8))
    assert trainer.global_step == 2
    _assert_same_weights(
        module.net, _plain_sgd([b for i, b in enumerate(_big_batches(32, [8] * 4)) if i % 2 == 0])
    )


def test_dict_output_reaches_on_train_batch_end() -> None:
    received: list[Any] = []

    class WithExtras(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return {"loss": super().training_step(batch, batch_idx), "extra": batch_idx * 10}

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            received.append(outputs["extra"])

    Trainer(max_epochs=1, **bare_trainer_kwargs()).fit(WithExtras(), loader(24, batch_size=8))
    assert received == [0, 10, 20]


class GradNorms(Callback):
    """Records the gradient norm just before zero_grad, i.e. what the step used."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_zero_grad(self, trainer: Any, module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_clipping_by_norm_after_unscaling_once_per_step(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    norms = GradNorms()
    trainer = Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        precision=precision,
        callbacks=[norms],
        **bare_trainer_kwargs(),
    )
    calls: list[float] = []
    original = trainer.accelerator.clip_grad_norm_

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        norm = original(*args, **kwargs)
        calls.append(float(norm))
        return norm

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", spy)
    trainer.fit(TinyModule(), loader(64, batch_size=8))
    assert len(calls) == trainer.global_step == 4
    # The norm before clipping is the unscaled one (far below the fp16 loss scale of 2**16)...
    assert all(0.05 < norm < 1000 for norm in calls)
    # ...and after clipping the step used a gradient of norm 0.05.
    assert all(norm == pytest.approx(0.05, rel=1e-3) for norm in norms.norms)


def test_clipping_by_value() -> None:
    class MaxGrad(Callback):
        largest = 0.0

        def on_before_zero_grad(self, trainer: Any, module: Any, optimizer: Any) -> None:
            for p in module.parameters():
                MaxGrad.largest = max(MaxGrad.largest, float(p.grad.abs().max()))

    trainer = Trainer(
        max_epochs=1,
        gradient_clip_val=0.01,
        gradient_clip_algorithm="value",
        callbacks=[MaxGrad()],
        **bare_trainer_kwargs(),
    )
    trainer.fit(TinyModule(), loader(32, batch_size=8))
    assert 0 < MaxGrad.largest <= 0.01 + 1e-9


def test_no_clipping_leaves_gradients_alone() -> None:
    norms = GradNorms()
    Trainer(max_epochs=1, callbacks=[norms], **bare_trainer_kwargs()).fit(
        TinyModule(), loader(32, batch_size=8)
    )
    assert max(norms.norms) > 0.05


class WithScheduler(TinyModule):
    def __init__(self, returned: str, interval: str = "step", frequency: int = 1) -> None:
        super().__init__()
        self.returned = returned
        self.interval = interval
        self.frequency = frequency

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        if self.returned == "tuple":
            return optimizer, scheduler
        if self.returned == "lists":
            return [optimizer], [scheduler]
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.interval,
                "frequency": self.frequency,
            },
        }


@pytest.mark.parametrize(
    ("returned", "interval", "frequency", "expected_steps"),
    [
        ("tuple", "epoch", 1, 2),  # default interval: epoch; 2 epochs
        ("lists", "epoch", 1, 2),
        ("dict", "step", 1, 8),  # 4 optimizer steps per epoch
        ("dict", "step", 3, 2),  # every 3rd of 8 steps
        ("dict", "epoch", 2, 1),
    ],
)
def test_scheduler_interval_and_frequency(
    returned: str, interval: str, frequency: int, expected_steps: int
) -> None:
    module = WithScheduler(returned, interval, frequency)
    trainer = Trainer(max_epochs=2, **bare_trainer_kwargs())
    trainer.fit(module, loader(32, batch_size=8))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.5**expected_steps)


def test_reduce_lr_on_plateau_reads_the_monitored_metric() -> None:
    class Plateau(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", 1.0)  # never improves

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, patience=0, factor=0.5
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"},
            }

    trainer = Trainer(max_epochs=3, num_sanity_val_steps=0, **bare_trainer_kwargs())
    trainer.fit(Plateau(), loader(16), loader(16))
    # Epoch 1 sets the best value; epochs 2 and 3 do not improve: the lr is halved twice.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


class CountValidation(Callback):
    def __init__(self) -> None:
        self.at: list[tuple[int, int]] = []
        self.batches = 0
        self.sanity_batches = 0

    def on_validation_start(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking:
            self.at.append((trainer.current_epoch, trainer.state.batch_idx))

    def on_validation_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.sanity_checking:
            self.sanity_batches += 1
        else:
            self.batches += 1


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [(0, 8), (1, 8)]),
        ({"val_check_interval": 0.5}, [(0, 4), (0, 8), (1, 4), (1, 8)]),
        ({"val_check_interval": 3}, [(0, 3), (0, 6), (1, 3), (1, 6)]),
        ({"check_val_every_n_epoch": 2}, [(1, 8)]),
        ({"val_check_interval": 5, "check_val_every_n_epoch": None}, [(0, 5), (1, 2), (1, 7)]),
    ],
)
def test_when_validation_runs(kwargs: dict[str, Any], expected: list[tuple[int, int]]) -> None:
    counter = CountValidation()
    trainer = Trainer(max_epochs=2, callbacks=[counter], **bare_trainer_kwargs(), **kwargs)
    trainer.fit(TinyModule(), loader(64, batch_size=8), loader(16, batch_size=8))
    assert counter.at == expected


def test_limits_and_sanity_steps() -> None:
    counter = CountValidation()
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=0.5,
        limit_val_batches=3,
        num_sanity_val_steps=1,
        callbacks=[counter],
        **bare_trainer_kwargs(),
    )
    trainer.fit(TinyModule(), loader(64, batch_size=8), loader(64, batch_size=8))
    assert trainer.global_step == 4
    assert counter.sanity_batches == 1
    assert counter.batches == 3
    # limit_test_batches and all sanity batches (-1)
    counter = CountValidation()
    trainer = Trainer(
        max_epochs=1,
        num_sanity_val_steps=-1,
        limit_test_batches=0.25,
        callbacks=[counter],
        **bare_trainer_kwargs(),
    )
    trainer.fit(TinyModule(), loader(16, batch_size=8), loader(40, batch_size=8))
    assert counter.sanity_batches == 5
    test_batches: list[int] = []

    class CountTest(Callback):
        def on_test_batch_end(self, *args: Any) -> None:
            test_batches.append(1)

    trainer.callbacks.append(CountTest())
    trainer.test(trainer.module, loader(64, batch_size=8))
    assert len(test_batches) == 2


def test_sanity_check_results_are_discarded() -> None:
    trainer = Trainer(max_steps=1, val_check_interval=8, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(64, batch_size=8), loader(16, batch_size=8))
    assert "val_loss" not in trainer.callback_metrics  # validation never ran after the check


def test_seed_makes_shuffled_runs_identical() -> None:
    def run() -> Tensor:
        module = TinyModule(hidden=8)
        trainer = Trainer(max_epochs=2, seed=123, **bare_trainer_kwargs())
        trainer.fit(module, DataLoader(regression_data(64), batch_size=8, shuffle=True))
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


def test_deterministic_switches_torch_to_deterministic_algorithms() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        Trainer(deterministic=True, **bare_trainer_kwargs())
        assert torch.are_deterministic_algorithms_enabled()
        Trainer(deterministic="warn", **bare_trainer_kwargs())
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_compile_compiles_the_steps() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def recording_eager(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    module = TinyModule()
    reference = copy.deepcopy(module)
    trainer = Trainer(max_epochs=1, compile={"backend": recording_eager}, **bare_trainer_kwargs())
    trainer.fit(module, loader(32, batch_size=8))
    assert any("mse_loss" in graph.code for graph in graphs)  # training_step's graph
    Trainer(max_epochs=1, **bare_trainer_kwargs()).fit(reference, loader(32, batch_size=8))
    _assert_same_weights(module.net, reference.net)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
def test_each_precision_trains_on_cpu(precision: str) -> None:
    module = TinyModule(hidden=16, lr=0.05)
    trainer = Trainer(
        max_epochs=4, precision=precision, num_sanity_val_steps=0, **bare_trainer_kwargs()
    )
    before = trainer.validate(module, loader(64))[0]["val_loss"]
    trainer.fit(module, loader(64), loader(64))
    after = trainer.callback_metrics["val_loss"]
    assert after < 0.7 * before
    expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(p.dtype == expected_dtype for p in module.parameters())
    assert trainer.accelerator.precision.name == precision


def test_validate_test_predict_results() -> None:
    module = TinyModule()
    trainer = Trainer(**bare_trainer_kwargs())
    x, y = regression_data(24).tensors
    expected = float(nn.functional.mse_loss(module(x), y).detach())
    # Batches of 8, 8, 8: the weighted mean equals the loss over all samples.
    (result,) = trainer.validate(module, loader(24, batch_size=8))
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    (result,) = trainer.test(module, loader(24, batch_size=8))
    assert result["test_loss"] == pytest.approx(expected, rel=1e-6)
    predictions = trainer.predict(module, loader(24, batch_size=8))
    torch.testing.assert_close(torch.cat(predictions), module(x).detach())
    two = trainer.validate(module, [loader(24, batch_size=8), loader(8, batch_size=8, seed=1)])
    assert list(two[0]) == ["val_loss/dataloader_idx_0"]
    assert list(two[1]) == ["val_loss/dataloader_idx_1"]


def test_loaders_from_module_methods() -> None:
    class OwnData(TinyModule):
        def train_dataloader(self) -> Any:
            return loader(16)

        def val_dataloader(self) -> Any:
            return loader(16)

    trainer = Trainer(max_epochs=1, **bare_trainer_kwargs())
    trainer.fit(OwnData())
    assert trainer.global_step == 2
    assert "val_loss" in trainer.callback_metrics


def test_module_properties_inside_the_loop() -> None:
    seen: list[tuple[int, int, str]] = []

    class Peek(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append((self.global_step, self.current_epoch, self.device.type))
            assert self.trainer.module is self
            return super().training_step(batch, batch_idx)

    Trainer(max_epochs=2, **bare_trainer_kwargs()).fit(Peek(), loader(16))
    assert seen == [(0, 0, "cpu"), (1, 0, "cpu"), (2, 1, "cpu"), (3, 1, "cpu")]


def test_val_loaders_without_validation_step_warn_and_skip() -> None:
    from ember import TrainModule

    class NoValidation(TinyModule):
        validation_step = TrainModule.validation_step  # type: ignore[assignment]

    counter = CountValidation()
    trainer = Trainer(max_epochs=1, callbacks=[counter], **bare_trainer_kwargs())
    with pytest.warns(UserWarning, match="no validation_step: validation is skipped"):
        trainer.fit(NoValidation(), loader(16), loader(16))
    assert counter.at == [] and counter.sanity_batches == 0


def test_limit_val_batches_zero_disables_validation() -> None:
    counter = CountValidation()
    trainer = Trainer(
        max_epochs=2, limit_val_batches=0, callbacks=[counter], **bare_trainer_kwargs()
    )
    trainer.fit(TinyModule(), loader(16), loader(16))
    assert counter.at == [] and counter.sanity_batches == 0 and counter.batches == 0


def test_second_fit_on_one_trainer_is_a_fresh_correct_run() -> None:
    """A Trainer reused for a second fit forgets the first optimizer (no double rescaling)
    and starts its loop progress from zero."""

    def weights_after_fit(trainer: Trainer) -> Tensor:
        module = SummedLoss()
        trainer.fit(module, [(x[:3], y[:3]), (x[3:8], y[3:8])])
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    x, y = regression_data(8).tensors
    kwargs = dict(max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=100.0)
    reused = Trainer(**kwargs, **bare_trainer_kwargs())
    first = weights_after_fit(reused)
    second = weights_after_fit(reused)
    fresh = weights_after_fit(Trainer(**kwargs, **bare_trainer_kwargs()))
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)
    assert reused.global_step == 1 and reused.current_epoch == 1
    assert len(reused.accelerator._tracked.optimizers) == 1


class LyingLength:
    """An iterable of batches whose __len__ says more than it yields."""

    def __init__(self, batches: list[Any], claimed: int) -> None:
        self.batches = batches
        self.claimed = claimed

    def __len__(self) -> int:
        return self.claimed

    def __iter__(self) -> Any:
        return iter(self.batches)


def test_a_length_that_overstates_still_closes_every_window() -> None:
    batches = _big_batches(40, [8] * 5)
    module = TinyModule()
    trainer = Trainer(max_epochs=2, accumulate_grad_batches=2, **bare_trainer_kwargs())
    trainer.fit(module, LyingLength(batches, claimed=6))
    assert trainer.global_step == 6  # windows of 2, 2, 1 in each epoch
    assert trainer._context is not None and trainer._context.window_losses == []
    reference = _big_batches(40, [16, 16, 8])
    _assert_same_weights(module.net, _plain_sgd(reference, epochs=2))


class EstimatedLength(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """An IterableDataset whose __len__ is only an estimate."""

    def __init__(self, samples: int, estimate: int) -> None:
        self.data = regression_data(samples)
        self.estimate = estimate

    def __len__(self) -> int:
        return self.estimate

    def __iter__(self) -> Any:
        return iter(zip(*self.data.tensors, strict=True))


@pytest.mark.parametrize("estimate", [16, 128])  # 64 samples really
def test_iterable_dataset_length_estimates_do_not_drive_the_loop(estimate: int) -> None:
    counter = CountValidation()
    module = TinyModule()
    trainer = Trainer(
        max_epochs=1, accumulate_grad_batches=2, callbacks=[counter], **bare_trainer_kwargs()
    )
    trainer.fit(module, DataLoader(EstimatedLength(64, estimate), batch_size=8), loader(16))
    assert trainer.global_step == 4  # 8 real batches, windows of 2
    assert counter.at == [(0, 8)]  # validated once, at the real end of the epoch
    _assert_same_weights(module.net, _plain_sgd(_big_batches(64, [16] * 4)))


def test_seedable_sampler_through_the_trainer() -> None:
    from ember import DataLoaderConfiguration

    def first_targets(global_seed: int) -> list[list[float]]:
        seen: list[list[float]] = []

        class Record(TinyModule):
            def training_step(self, batch: Any, batch_idx: int) -> Any:
                if batch_idx == 0:
                    seen.append(batch[1].flatten().tolist())
                return super().training_step(batch, batch_idx)

        torch.manual_seed(global_seed)
        config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=11)
        trainer = Trainer(max_epochs=3, dataloader_config=config, **bare_trainer_kwargs())
        trainer.fit(Record(), DataLoader(regression_data(32), batch_size=8, shuffle=True))
        return seen

    first, second = first_targets(1), first_targets(2)
    assert first == second  # the order comes from data_seed and the epoch alone
    assert first[0] != first[1]  # and changes every epoch
