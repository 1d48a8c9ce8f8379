"""Prepared optimizers and schedulers survive pickle and deepcopy in every precision, also
with an fp16 grad-scaler update still pending, and the copy steps like the original."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from ember import Accelerator


def _prepared(mixed_precision: str) -> tuple[Accelerator, Any, Any, Any]:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def _iteration(model: Any, optimizer: Any, scheduler: Any) -> None:
    """One iteration; the backward of the optimizer's own accelerator state (a copied
    optimizer carries its own copy of it: gradient state, grad scaler)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    optimizer.stepper.backward(nn.functional.mse_loss(model(x).float(), y), None, {})
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _copy(objects: Any, how: str) -> Any:
    return copy.deepcopy(objects) if how == "deepcopy" else pickle.loads(pickle.dumps(objects))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_prepared_optimizer_and_scheduler_copy_and_the_copy_steps_like_the_original(
    mixed_precision: str, how: str
) -> None:
    accelerator, model, optimizer, scheduler = _prepared(mixed_precision)
    _iteration(model, optimizer, scheduler)  # fp16: the scaler update is pending
    model_copy, optimizer_copy, scheduler_copy = _copy((model, optimizer, scheduler), how)
    assert type(optimizer_copy) is type(optimizer)
    assert type(scheduler_copy) is type(scheduler)
    assert optimizer_copy.optimizer is not optimizer.optimizer
    assert scheduler_copy.scheduler.optimizer is optimizer_copy.optimizer
    assert all(
        copied is parameter
        for copied, parameter in zip(
            optimizer_copy.param_groups[0]["params"], model_copy.parameters(), strict=True
        )
    )
    before = [parameter.detach().clone() for parameter in model.parameters()]
    # The copy takes the next step on its own weights, leaving the original untouched...
    _iteration(model_copy, optimizer_copy, scheduler_copy)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    # ... and ends where the original ends after the same step.
    _iteration(model, optimizer, scheduler)
    for copied, original in zip(model_copy.parameters(), model.parameters(), strict=True):
        assert torch.equal(copied, original)
    assert scheduler_copy.get_last_lr() == scheduler.get_last_lr()
    if mixed_precision != "fp16":  # fp16: the first step overflows at the initial scale
        assert scheduler.get_last_lr() == [0.025]
    else:
        scaler = accelerator.precision.scaler  # type: ignore[attr-defined]
        scaler_copy = optimizer_copy.stepper.precision.scaler
        assert scaler_copy is not scaler
        accelerator.end_training()
        optimizer_copy.stepper.end_iteration()
        assert scaler_copy.get_scale() == scaler.get_scale()


def test_a_failed_pickle_with_a_pending_update_changes_nothing() -> None:
    _, model, optimizer, scheduler = _prepared("fp16")
    _iteration(model, optimizer, scheduler)
    scaler = optimizer.stepper.precision.scaler  # type: ignore[attr-defined]
    getstate = type(scaler).__getstate__
    pending = dict(scaler._per_optimizer_states)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps((optimizer, lambda: None))  # a lambda cannot be pickled
    assert type(scaler).__getstate__ is getstate
    assert dict(scaler._per_optimizer_states) == pending
    # GradScaler's own rule still holds for a scaler used outside ember.
    with pytest.raises(AssertionError, match="may only be pickled"):
        pickle.dumps(scaler)
    _iteration(model, optimizer, scheduler)  # the original carries on
