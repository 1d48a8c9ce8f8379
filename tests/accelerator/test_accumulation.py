"""Gradient accumulation: ``accumulate`` + ``backward`` + the wrapped optimizer and scheduler
give the same weights as plain PyTorch on bigger batches.

Every reference is computed here with plain ``torch``: one optimizer step per big batch, where
a big batch is the concatenation of the micro-batches of one accumulation window.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ember import Accelerator
from tests.helpers import regression_data

FEATURES = 4
MICRO_BATCH = 4
LR = 0.1
MOMENTUM = 0.9


def make_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, 1)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Momentum makes the result depend on the number of steps as well as on each gradient.
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def window_sizes(num_batches: int, steps: int) -> list[int]:
    """How many micro-batches each accumulation window holds (the last one may be short)."""
    return [min(steps, num_batches - start) for start in range(0, num_batches, steps)]


def expected_sync_flags(num_batches: int, steps: int) -> list[bool]:
    return [
        (index % steps == steps - 1) or index == num_batches - 1 for index in range(num_batches)
    ]


def split(dataset: TensorDataset, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Consecutive batches of the given sizes."""
    x, y = dataset.tensors
    batches, start = [], 0
    for size in sizes:
        batches.append((x[start : start + size], y[start : start + size]))
        start += size
    return batches


def train_plain(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> nn.Module:
    """Plain PyTorch: one step per batch on the mean loss."""
    optimizer = make_optimizer(model)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model


def train_accelerated(
    accelerator: Accelerator,
    model: nn.Module,
    loader: Any,
    epochs: int = 1,
    after_batch: Callable[[int], None] | None = None,
) -> tuple[nn.Module, list[bool]]:
    """The Accelerate-style loop; returns the model and ``sync_gradients`` of every batch."""
    optimizer = make_optimizer(model)
    model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
    flags: list[bool] = []
    for _ in range(epochs):
        for index, (x, y) in enumerate(prepared):
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                flags.append(accelerator.sync_gradients)
                optimizer.step()
                optimizer.zero_grad()
            if after_batch is not None:
                after_batch(index)
    return model, flags


def assert_same_weights(actual: nn.Module, expected: nn.Module) -> None:
    for (name, got), (_, want) in zip(
        actual.named_parameters(), expected.named_parameters(), strict=True
    ):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), name


class SampleStream(IterableDataset):
    """The same samples as a ``TensorDataset``, but with no ``__len__``."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.dataset.tensors
        yield from zip(x, y, strict=True)


@pytest.mark.parametrize(
    ("num_batches", "steps"),
    [(8, 1), (8, 2), (8, 4), (7, 3), (5, 2), (3, 4)],
    ids=["k1", "k2-even", "k4-even", "k3-short-last", "k2-short-last", "window-longer-than-loader"],
)
def test_accumulation_equals_big_batches(num_batches: int, steps: int) -> None:
    dataset = regression_data(num_batches * MICRO_BATCH, FEATURES)
    sizes = [count * MICRO_BATCH for count in window_sizes(num_batches, steps)]
    expected = train_plain(make_model(), split(dataset, sizes))

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    assert accelerator.gradient_accumulation_steps == steps
    loader = DataLoader(dataset, batch_size=MICRO_BATCH)
    model, flags = train_accelerated(accelerator, make_model(), loader)

    assert flags == expected_sync_flags(num_batches, steps)
    assert_same_weights(model, expected)


def test_windows_restart_every_epoch() -> None:
    num_batches, steps, epochs = 5, 2, 2
    dataset = regression_data(num_batches * MICRO_BATCH, FEATURES)
    sizes = [count * MICRO_BATCH for count in window_sizes(num_batches, steps)]
    expected = train_plain(make_model(), split(dataset, sizes) * epochs)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    loader = DataLoader(dataset, batch_size=MICRO_BATCH)
    model, flags = train_accelerated(accelerator, make_model(), loader, epochs=epochs)

    assert flags == expected_sync_flags(num_batches, steps) * epochs
    assert_same_weights(model, expected)


def test_step_and_zero_grad_do_nothing_mid_window() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = make_model()
    optimizer = make_optimizer(model)
    loader = DataLoader(regression_data(6 * MICRO_BATCH, FEATURES), batch_size=MICRO_BATCH)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for index, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            weights = [parameter.detach().clone() for parameter in model.parameters()]
            grads = [parameter.grad.clone() for parameter in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            if index % 3 < 2:  # mid-window: nothing moves, the gradient is kept
                assert not accelerator.sync_gradients
                for parameter, before, grad in zip(model.parameters(), weights, grads, strict=True):
                    assert torch.equal(parameter, before)
                    assert parameter.grad is not None
                    assert torch.equal(parameter.grad, grad)
            else:  # the window's last batch: a real step, then the gradient is cleared
                assert accelerator.sync_gradients
                for parameter, before in zip(model.parameters(), weights, strict=True):
                    assert not torch.equal(parameter, before)
                    assert parameter.grad is None


def test_gradient_accumulates_over_the_window() -> None:
    """Mid-window the gradient is the running sum of the divided micro-batch gradients."""
    steps = 2
    dataset = regression_data(2 * MICRO_BATCH, FEATURES)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    model = make_model()
    optimizer = make_optimizer(model)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(dataset, batch_size=MICRO_BATCH)
    )
    x, y = next(iter(loader))
    with accelerator.accumulate(model):
        accelerator.backward(nn.functional.mse_loss(model(x), y))

    reference = make_model()
    (nn.functional.mse_loss(reference(x), y) / steps).backward()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got.grad, want.grad, atol=1e-7)


def test_loader_without_length_normalises_its_short_last_window() -> None:
    num_batches, steps = 7, 3
    dataset = regression_data(num_batches * MICRO_BATCH, FEATURES)
    sizes = [count * MICRO_BATCH for count in window_sizes(num_batches, steps)]
    expected = train_plain(make_model(), split(dataset, sizes))

    loader = DataLoader(SampleStream(dataset), batch_size=MICRO_BATCH)
    with pytest.raises(TypeError):
        len(loader)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    model, flags = train_accelerated(accelerator, make_model(), loader)

    assert flags == expected_sync_flags(num_batches, steps)
    assert_same_weights(model, expected)


def test_clip_sees_the_normalised_gradient_of_a_short_window_without_length() -> None:
    """``clip_grad_norm_`` at the end of a short last window (loader without a length)
    measures the big-batch gradient, not the one divided by the full window size."""
    num_batches, steps = 4, 3  # windows of 3 and 1 micro-batches
    dataset = regression_data(num_batches * MICRO_BATCH, FEATURES)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights fixed
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(SampleStream(dataset), batch_size=MICRO_BATCH)
    )
    norms = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            if accelerator.sync_gradients:
                norms.append(accelerator.clip_grad_norm_(model.parameters(), 1e9))
            optimizer.step()
            optimizer.zero_grad()

    expected = []
    for x, y in split(dataset, [3 * MICRO_BATCH, MICRO_BATCH]):
        reference = make_model()
        nn.functional.mse_loss(reference(x), y).backward()
        expected.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9))
    assert len(norms) == 2
    for got, want in zip(norms, expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_equals_one_big_batch_with_mean_loss(as_tensor: bool) -> None:
    """Summed losses over micro-batches of different sizes, divided by the window's item
    count at the step, equal the mean loss over the window's concatenated items."""
    micro_sizes = [3, 5, 2, 4, 6]  # windows of 2: [3, 5], [2, 4], [6]
    steps = 2
    dataset = regression_data(sum(micro_sizes), FEATURES)
    big_sizes = [3 + 5, 2 + 4, 6]
    expected = train_plain(make_model(), split(dataset, big_sizes))

    starts = [sum(micro_sizes[:index]) for index in range(len(micro_sizes))]
    batch_sampler = [
        list(range(start, start + size)) for start, size in zip(starts, micro_sizes, strict=True)
    ]
    loader = DataLoader(dataset, batch_sampler=batch_sampler)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    model = make_model()
    optimizer = make_optimizer(model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    seen_sizes = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y, reduction="sum")
            count = torch.tensor(len(x)) if as_tensor else len(x)
            accelerator.backward(loss, num_items=count)
            optimizer.step()
            optimizer.zero_grad()
        seen_sizes.append(len(x))

    assert seen_sizes == micro_sizes
    assert_same_weights(model, expected)


def test_loop_without_accumulate_steps_every_batch() -> None:
    """``accumulate`` is optional: without it every ``step`` is a plain optimizer step."""
    dataset = regression_data(3 * MICRO_BATCH, FEATURES)
    batches = split(dataset, [MICRO_BATCH] * 3)
    expected = train_plain(make_model(), batches)

    accelerator = Accelerator(cpu=True)
    model = make_model()
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    for x, y in batches:
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    assert_same_weights(model, expected)


def test_num_items_without_accumulate_counts_each_step_on_its_own() -> None:
    sizes = [3, 5, 4]
    dataset = regression_data(sum(sizes), FEATURES)
    batches = split(dataset, sizes)
    expected = train_plain(make_model(), batches)

    accelerator = Accelerator(cpu=True)
    model = make_model()
    model, optimizer = accelerator.prepare(model, make_optimizer(model))
    for x, y in batches:
        loss = nn.functional.mse_loss(model(x), y, reduction="sum")
        accelerator.backward(loss, num_items=len(x))
        optimizer.step()
        optimizer.zero_grad()
    assert_same_weights(model, expected)


def test_validation_mid_window_leaves_the_training_windows_intact() -> None:
    num_batches, steps = 7, 3
    dataset = regression_data(num_batches * MICRO_BATCH, FEATURES)
    sizes = [count * MICRO_BATCH for count in window_sizes(num_batches, steps)]
    expected = train_plain(make_model(), split(dataset, sizes))

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    # Five validation batches: longer than a window, and not a multiple of it.
    validation = accelerator.prepare(
        DataLoader(regression_data(5 * MICRO_BATCH, FEATURES, seed=1), batch_size=MICRO_BATCH)
    )
    holder: dict[str, nn.Module] = {}
    validation_batches = []

    def validate_mid_window(index: int) -> None:
        if index % steps == steps - 1:
            return
        with torch.no_grad():
            for x, _ in validation:
                holder["model"](x)
                validation_batches.append(len(x))

    model = make_model()
    holder["model"] = model
    trained, flags = train_accelerated(
        accelerator,
        model,
        DataLoader(dataset, batch_size=MICRO_BATCH),
        after_batch=validate_mid_window,
    )

    assert validation_batches  # the validation loop really ran mid-window
    assert flags == expected_sync_flags(num_batches, steps)
    assert_same_weights(trained, expected)


# --- the wrapped scheduler -------------------------------------------------------------------


def _accelerated_with_scheduler(
    steps: int, **accelerator_kwargs: Any
) -> tuple[Accelerator, nn.Module, Any, Any, Any]:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps, **accelerator_kwargs)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    loader = DataLoader(regression_data(4 * MICRO_BATCH, FEATURES), batch_size=MICRO_BATCH)
    return accelerator, *accelerator.prepare(model, optimizer, scheduler, loader)


def test_scheduler_steps_only_when_the_optimizer_stepped() -> None:
    accelerator, model, optimizer, scheduler, loader = _accelerated_with_scheduler(steps=2)
    learning_rates = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        learning_rates.append(optimizer.param_groups[0]["lr"])

    # Four batches, windows of two: the rate halves after the 2nd and the 4th batch only.
    assert learning_rates == pytest.approx([LR, LR / 2, LR / 2, LR / 4])
    assert scheduler.get_last_lr() == pytest.approx([LR / 4])


def test_scheduler_steps_every_call_when_not_tied_to_the_optimizer() -> None:
    accelerator, model, optimizer, scheduler, loader = _accelerated_with_scheduler(
        steps=2, step_scheduler_with_optimizer=False
    )
    learning_rates = []
    with warnings.catch_warnings():
        # torch warns when a scheduler steps before its optimizer did: that is the point here.
        warnings.simplefilter("ignore", UserWarning)
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            learning_rates.append(optimizer.param_groups[0]["lr"])

    assert learning_rates == pytest.approx([LR / 2, LR / 4, LR / 8, LR / 16])


def test_scheduler_built_on_the_prepared_optimizer() -> None:
    """A scheduler made after ``prepare`` (on the wrapped optimizer) still follows the window."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    model, optimizer, loader = accelerator.prepare(
        model,
        torch.optim.SGD(model.parameters(), lr=LR),
        DataLoader(regression_data(4 * MICRO_BATCH, FEATURES), batch_size=MICRO_BATCH),
    )
    scheduler = accelerator.prepare(
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    )
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 4)


def test_fp16_skipped_step_is_reported_and_the_scheduler_waits() -> None:
    accelerator, model, optimizer, scheduler, _ = _accelerated_with_scheduler(
        steps=1, mixed_precision="fp16"
    )
    # Small values, so that the gradient scaled by 2**16 stays finite in float16.
    x, y = (0.1 * tensor for tensor in regression_data(MICRO_BATCH, FEATURES).tensors)
    with torch.no_grad():
        model.bias.zero_()

    # A step with an inf gradient: the GradScaler skips it.
    with accelerator.autocast():
        loss = nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    model.weight.grad[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    assert accelerator.optimizer_step_was_skipped
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR)

    # The next, finite step goes through and the scheduler follows it.
    with accelerator.autocast():
        loss = nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    assert not accelerator.optimizer_step_was_skipped
    assert not torch.equal(model.weight, before["weight"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)
