"""The optimizer step of a hand-written Accelerator loop, each case against plain PyTorch.

Every test runs the same seeded model on the same batches twice: once through
``ember.Accelerator`` and once written by hand in plain PyTorch (``torch.amp.GradScaler`` and
``torch.autocast`` for fp16, PyTorch's AMP recipe for several models and optimizers). fp32
runs must give bit-identical weights; fp16 runs the same weights and the same loss scale.

Pinned here: one GradScaler update per loop iteration whatever the number of optimizers,
gradients unscaled and normalised exactly once per step (and nothing left behind by a skipped
step), ``step(closure)``, the ``torch.optim.Optimizer`` hooks on a prepared optimizer,
accumulation windows that a second open loader iterator leaves alone, ``end_of_dataloader``
on every path, and a prepared model's forward running under autocast.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ember import Accelerator

FEATURES = 4
BATCH = 8
# PyTorch's default GradScaler settings, which the accelerator uses too.
INIT_SCALE = 2.0**16


# --- data and models ---------------------------------------------------------------------------


def dataset(batches: int, big_first: bool = False, seed: int = 0) -> TensorDataset:
    """``batches`` batches of a small regression problem.

    Values are small, so fp16 gradients scaled by 2**16 stay finite; with ``big_first`` the
    first batch is 100 times larger, so its scaled fp16 gradient overflows: the GradScaler
    skips that step and halves the scale, which makes the scale's history observable.
    """
    generator = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(batches * BATCH, FEATURES, generator=generator)
    weight = torch.randn(FEATURES, 1, generator=generator)
    y = x @ weight + 0.05 * torch.randn(batches * BATCH, 1, generator=generator)
    if big_first:
        x[:BATCH] *= 100.0
        y[:BATCH] *= 100.0
    return TensorDataset(x, y)


def mlp(seed: int, out_features: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, out_features))


def twins(seed: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The same initial model twice: one for ember, one for the plain PyTorch reference."""
    model = mlp(seed)
    return model, copy.deepcopy(model)


def mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    # `.float()` on the output: the prepared model returns float32 under mixed precision (as
    # Accelerate's convert_outputs_to_fp32 does), so both sides compute the loss in float32.
    return F.mse_loss(model(x).float(), y)


def fp16_autocast() -> Any:
    return torch.autocast("cpu", dtype=torch.float16)


def clip(model: nn.Module, max_norm: float = 1.0) -> Tensor:
    return torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)


def assert_same_weights(model: nn.Module, reference: nn.Module, exact: bool = True) -> None:
    for (name, mine), theirs in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        if exact:
            assert torch.equal(mine, theirs), (
                f"{name}: max difference {(mine - theirs).abs().max().item():.3g}\n"
                f"ember {mine.flatten()[:4]}\ntorch {theirs.flatten()[:4]}"
            )
        else:
            torch.testing.assert_close(
                mine,
                theirs,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda message, name=name: f"{name}: {message}",
            )


def scale_of(accelerator: Accelerator) -> float:
    return float(accelerator.precision.scaler.get_scale())  # type: ignore[attr-defined]


def cpu_accelerator(**kwargs: Any) -> Accelerator:
    return Accelerator(cpu=True, **kwargs)


# --- 1. several optimizers, one GradScaler ---------------------------------------------------


def test_two_models_fp16_one_scaler_update_per_loader_batch() -> None:
    """Two models stepped one after the other in each iteration (backward, clip, step per
    model), as in PyTorch's AMP recipe: the scaler unscales each optimizer once and updates
    once per iteration, so the second model moves like the first."""
    data = dataset(5, big_first=True)
    model_a, ref_a = twins(1)
    model_b, ref_b = twins(2)

    # Plain torch.amp: per optimizer unscale_, clip, step; one update() per iteration.
    scaler = torch.amp.GradScaler("cpu")
    ref_opt_a = torch.optim.SGD(ref_a.parameters(), lr=0.1)
    ref_opt_b = torch.optim.SGD(ref_b.parameters(), lr=0.1)
    ref_scales = []
    for x, y in DataLoader(data, batch_size=BATCH):
        for model, opt in ((ref_a, ref_opt_a), (ref_b, ref_opt_b)):
            with fp16_autocast():
                loss = mse(model, x, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            clip(model)
            scaler.step(opt)
            opt.zero_grad()
        scaler.update()
        ref_scales.append(scaler.get_scale())
    # The big first batch overflowed once: one halving for the iteration, not one per model.
    assert ref_scales[0] == INIT_SCALE / 2 and ref_scales[-1] == INIT_SCALE / 2

    accelerator = cpu_accelerator(mixed_precision="fp16")
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    model_a, model_b, opt_a, opt_b, loader = accelerator.prepare(
        model_a, model_b, opt_a, opt_b, DataLoader(data, batch_size=BATCH)
    )
    for x, y in loader:
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            with accelerator.autocast():
                loss = mse(model, x, y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    accelerator.end_training()  # applies the last iteration's pending update

    assert_same_weights(model_a, ref_a, exact=False)
    assert_same_weights(model_b, ref_b, exact=False)
    assert scale_of(accelerator) == ref_scales[-1]


def test_two_models_fp16_amp_recipe_without_loader() -> None:
    """PyTorch's AMP recipe exactly ("multiple models, losses and optimizers"): both
    backwards, then unscale, clip and step each optimizer, then one update. No prepared
    loader and no ``accumulate``: the next iteration starts at the first ``backward`` after
    a ``step``."""
    data = dataset(5, big_first=True)
    batches = list(DataLoader(data, batch_size=BATCH))
    model_a, ref_a = twins(1)
    model_b, ref_b = twins(2)

    scaler = torch.amp.GradScaler("cpu")
    ref_opt_a = torch.optim.SGD(ref_a.parameters(), lr=0.1)
    ref_opt_b = torch.optim.SGD(ref_b.parameters(), lr=0.1)
    for x, y in batches:
        ref_opt_a.zero_grad()
        ref_opt_b.zero_grad()
        with fp16_autocast():
            loss_a = mse(ref_a, x, y)
            loss_b = mse(ref_b, x, y)
        scaler.scale(loss_a).backward()
        scaler.scale(loss_b).backward()
        scaler.unscale_(ref_opt_a)
        clip(ref_a)
        scaler.step(ref_opt_a)
        scaler.unscale_(ref_opt_b)
        clip(ref_b)
        scaler.step(ref_opt_b)
        scaler.update()

    accelerator = cpu_accelerator(mixed_precision="fp16")
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    model_a, model_b, opt_a, opt_b = accelerator.prepare(model_a, model_b, opt_a, opt_b)
    for x, y in batches:
        opt_a.zero_grad()
        opt_b.zero_grad()
        with accelerator.autocast():
            loss_a = mse(model_a, x, y)
            loss_b = mse(model_b, x, y)
        accelerator.backward(loss_a)
        accelerator.backward(loss_b)
        accelerator.clip_grad_norm_(model_a.parameters(), 1.0)
        opt_a.step()
        accelerator.clip_grad_norm_(model_b.parameters(), 1.0)
        opt_b.step()
    accelerator.end_training()

    assert_same_weights(model_a, ref_a, exact=False)
    assert_same_weights(model_b, ref_b, exact=False)
    assert scale_of(accelerator) == scaler.get_scale() == INIT_SCALE / 2


# --- 2. step(closure) --------------------------------------------------------------------------


def test_lbfgs_with_closure_trains_like_plain_lbfgs() -> None:
    x, y = dataset(1).tensors
    model, reference = twins(3)

    ref_opt = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=4)

    def ref_closure() -> Tensor:
        ref_opt.zero_grad()
        loss = mse(reference, x, y)
        loss.backward()
        return loss

    ref_losses = [ref_opt.step(ref_closure).item() for _ in range(3)]

    accelerator = cpu_accelerator()
    model, opt = accelerator.prepare(
        model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = mse(model, x, y)
        accelerator.backward(loss)
        return loss

    losses = [opt.step(closure).item() for _ in range(3)]
    assert losses == ref_losses
    assert_same_weights(model, reference)


def test_sgd_step_with_closure_returns_its_loss_and_steps() -> None:
    x, y = dataset(1).tensors
    model, reference = twins(4)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    accelerator = cpu_accelerator()
    model, opt = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )

    for _ in range(3):

        def ref_closure() -> Tensor:
            ref_opt.zero_grad()
            loss = mse(reference, x, y)
            loss.backward()
            return loss

        def closure() -> Tensor:
            opt.zero_grad()
            loss = mse(model, x, y)
            accelerator.backward(loss)
            return loss

        expected = ref_opt.step(ref_closure)
        returned = opt.step(closure=closure)
        assert isinstance(returned, Tensor)
        assert torch.equal(returned, expected)
    assert_same_weights(model, reference)


def test_step_passes_keyword_arguments_to_the_optimizer() -> None:
    class ScaledSGD(torch.optim.SGD):
        def step(self, closure: Any = None, *, factor: float = 1.0) -> Any:  # type: ignore[override]
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(factor)
            return super().step(closure)

    x, y = dataset(1).tensors
    model, reference = twins(5)
    ref_opt = ScaledSGD(reference.parameters(), lr=0.1)
    mse(reference, x, y).backward()
    assert ref_opt.step(factor=0.5) is None

    accelerator = cpu_accelerator()
    model, opt = accelerator.prepare(model, ScaledSGD(model.parameters(), lr=0.1))
    accelerator.backward(mse(model, x, y))
    assert opt.step(factor=0.5) is None
    assert_same_weights(model, reference)


def _plain_closure_error() -> tuple[type[BaseException], str]:
    model = mlp(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = dataset(1).tensors
    with fp16_autocast():
        loss = mse(model, x, y)
    scaler.scale(loss).backward()
    with pytest.raises(Exception) as raised:
        scaler.step(opt, closure=lambda: loss)
    return type(raised.value), str(raised.value)


@pytest.mark.parametrize("how", ["keyword", "positional"])
def test_fp16_step_with_closure_raises_like_the_grad_scaler(how: str) -> None:
    error_type, message = _plain_closure_error()
    assert error_type is RuntimeError and "Closure" in message

    x, y = dataset(1).tensors
    accelerator = cpu_accelerator(mixed_precision="fp16")
    model = mlp(6)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = copy.deepcopy(model.state_dict())
    with accelerator.autocast():
        loss = mse(model, x, y)
    accelerator.backward(loss)

    def closure() -> Tensor:
        return loss

    with pytest.raises(error_type, match=re.escape(message)):
        if how == "keyword":
            opt.step(closure=closure)
        else:
            opt.step(closure)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


# --- 3. a step skipped after clipping leaves nothing behind -------------------------------------


def test_fp16_clip_then_skipped_step_then_a_real_step() -> None:
    """The user clips (which unscales) but decides not to step on iteration 1. In plain
    torch.amp that iteration still ends with ``scaler.update()``, which forgets the unscale;
    the next iteration's gradient is unscaled afresh and the step matches."""
    data = dataset(4)
    model, reference = twins(7)
    skip = {1}

    scaler = torch.amp.GradScaler("cpu")
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_norms = []
    for index, (x, y) in enumerate(DataLoader(data, batch_size=BATCH)):
        with fp16_autocast():
            loss = mse(reference, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(ref_opt)
        ref_norms.append(clip(reference).item())
        if index not in skip:
            scaler.step(ref_opt)
        scaler.update()
        ref_opt.zero_grad()

    accelerator = cpu_accelerator(mixed_precision="fp16")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=BATCH))
    norms = []
    for index, (x, y) in enumerate(loader):
        with accelerator.autocast():
            loss = mse(model, x, y)
        accelerator.backward(loss)
        norms.append(accelerator.clip_grad_norm_(model.parameters(), 1.0).item())
        if index not in skip:
            opt.step()
        opt.zero_grad()
    accelerator.end_training()

    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert_same_weights(model, reference, exact=False)
    assert scale_of(accelerator) == scaler.get_scale()


def test_num_items_clip_then_skipped_step_then_a_real_step() -> None:
    """``backward(loss_sum, num_items=n)`` then clip (which normalises by n), no step on
    iteration 1, ``zero_grad`` anyway: the next step's gradient is divided by its own n."""
    data = dataset(4)
    model, reference = twins(8)
    skip = {1}

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_norms = []
    for index, (x, y) in enumerate(DataLoader(data, batch_size=BATCH)):
        loss_sum = F.mse_loss(reference(x), y, reduction="sum")
        loss_sum.backward()
        for p in reference.parameters():
            p.grad.div_(len(y))  # type: ignore[union-attr]
        ref_norms.append(clip(reference, 10.0).item())
        if index not in skip:
            ref_opt.step()
        ref_opt.zero_grad()

    accelerator = cpu_accelerator()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=BATCH))
    norms = []
    for index, (x, y) in enumerate(loader):
        loss_sum = F.mse_loss(model(x), y, reduction="sum")
        accelerator.backward(loss_sum, num_items=len(y))
        norms.append(accelerator.clip_grad_norm_(model.parameters(), 10.0).item())
        if index not in skip:
            opt.step()
        opt.zero_grad()

    assert norms == ref_norms
    assert_same_weights(model, reference)


# --- 4. a second open iterator leaves the training windows alone -------------------------------


@pytest.mark.parametrize("val_batches", [3, 10], ids=["val_cycled", "val_longer"])
@pytest.mark.parametrize("val_iterator", ["before_loop", "lazy"])
@pytest.mark.parametrize("val_draw", ["before_accumulate", "after_accumulate"])
def test_second_open_iterator_does_not_disturb_accumulation(
    val_iterator: str, val_draw: str, val_batches: int
) -> None:
    """A validation iterator drawn from inside the training loop (3 batches: exhausted and
    started again twice; 10: still open at the end) leaves the training windows alone."""
    train = dataset(6)
    val = dataset(val_batches, seed=1)
    model, reference = twins(9)

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for index, (x, y) in enumerate(DataLoader(train, batch_size=BATCH)):
        (mse(reference, x, y) / 2).backward()
        if index % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()

    accelerator = cpu_accelerator(gradient_accumulation_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, train_loader, val_loader = accelerator.prepare(
        model, opt, DataLoader(train, batch_size=BATCH), DataLoader(val, batch_size=BATCH)
    )
    val_iter: Iterator[Any] | None = iter(val_loader) if val_iterator == "before_loop" else None
    val_losses = []

    def validate_one_batch() -> None:
        nonlocal val_iter
        if val_iter is None:
            val_iter = iter(val_loader)
        try:
            vx, vy = next(val_iter)
        except StopIteration:
            val_iter = iter(val_loader)
            vx, vy = next(val_iter)
        with torch.no_grad():
            val_losses.append(mse(model, vx, vy).item())

    syncs = []
    for x, y in train_loader:
        if val_draw == "before_accumulate":
            validate_one_batch()
        with accelerator.accumulate(model):
            syncs.append(accelerator.sync_gradients)
            accelerator.backward(mse(model, x, y))
            opt.step()
            opt.zero_grad()
        if val_draw == "after_accumulate":
            validate_one_batch()

    assert syncs == [False, True] * 3
    assert len(val_losses) == 6
    assert_same_weights(model, reference)


@pytest.mark.parametrize("val_draw", ["before_accumulate", "after_accumulate"])
def test_iterator_kept_open_over_epochs_leaves_later_epochs_alone(val_draw: str) -> None:
    """A validation iterator opened once and drawn from every batch, over three epochs of 5
    training batches (windows of 2, 2, 1): each epoch's windows are the training loader's."""
    train = dataset(5)
    val = dataset(40, seed=1)
    model, reference = twins(3)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        for index, (x, y) in enumerate(DataLoader(train, batch_size=BATCH)):
            (mse(reference, x, y) / (1 if index == 4 else 2)).backward()
            if index % 2 == 1 or index == 4:
                ref_opt.step()
                ref_opt.zero_grad()

    accelerator = cpu_accelerator(gradient_accumulation_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, train_loader, val_loader = accelerator.prepare(
        model, opt, DataLoader(train, batch_size=BATCH), DataLoader(val, batch_size=BATCH)
    )
    val_iter = iter(val_loader)
    syncs = []
    for _ in range(3):
        for x, y in train_loader:
            if val_draw == "before_accumulate":
                next(val_iter)
            with accelerator.accumulate(model):
                syncs.append(accelerator.sync_gradients)
                accelerator.backward(mse(model, x, y))
                opt.step()
                opt.zero_grad()
            if val_draw == "after_accumulate":
                next(val_iter)

    assert syncs == [False, True, False, True, True] * 3
    assert_same_weights(model, reference)


# --- 5. end_of_dataloader on every path ---------------------------------------------------------


class Stream(IterableDataset):
    """An iterable dataset (no length): the loader's end is found by reading ahead."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.data)


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("kind", ["sized", "iterable"])
def test_end_of_dataloader_marks_exactly_the_last_batch(accumulation: int, kind: str) -> None:
    data = dataset(5)
    raw = DataLoader(data if kind == "sized" else Stream(data), batch_size=BATCH)
    batches = len(list(raw))  # plain PyTorch: the batches one pass yields
    assert batches == 5

    accelerator = cpu_accelerator(gradient_accumulation_steps=accumulation)
    model = mlp(10)
    model, opt, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), raw
    )
    for _epoch in range(2):
        seen = []
        for x, y in loader:
            with accelerator.accumulate(model):
                seen.append(accelerator.gradient_state.end_of_dataloader)
                accelerator.backward(mse(model, x, y))
                opt.step()
                opt.zero_grad()
        assert seen == [False] * (batches - 1) + [True]


def test_end_of_dataloader_without_accumulate() -> None:
    """A loop that never enters ``accumulate`` sees the flag as it draws the batch."""
    data = dataset(3)
    accelerator = cpu_accelerator()
    loader = accelerator.prepare(DataLoader(data, batch_size=BATCH))
    seen = [accelerator.gradient_state.end_of_dataloader for _ in loader]
    assert seen == [False, False, True]


# --- 6. a prepared optimizer is a real torch.optim.Optimizer ----------------------------------


def _hooked(opt: torch.optim.Optimizer, events: list[Any], where: Callable[[], int]) -> None:
    """Register every optimizer hook on ``opt``; each appends (event, batch index)."""
    opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("step_pre", where())))
    opt.register_step_post_hook(lambda o, args, kwargs: events.append(("step_post", where())))
    opt.register_state_dict_pre_hook(lambda o: events.append(("state_dict_pre", where())))

    def state_dict_post(o: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        events.append(("state_dict_post", where()))
        state_dict["hooked"] = True
        return state_dict

    opt.register_state_dict_post_hook(state_dict_post)

    def load_pre(o: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        events.append(("load_pre", state_dict.pop("hooked", None)))
        return state_dict

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: events.append(("load_post", where())))


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_optimizer_hooks_fire_as_on_the_raw_optimizer(mixed_precision: str) -> None:
    """Step hooks fire only when the real optimizer steps: not inside an accumulation window,
    and not when the fp16 GradScaler skips an overflowing step (the big first batch)."""
    data = dataset(6, big_first=mixed_precision == "fp16")
    model, reference = twins(11)
    fp16 = mixed_precision == "fp16"
    index = 0

    def where() -> int:
        return index

    ref_events: list[Any] = []
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    _hooked(ref_opt, ref_events, where)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    for index, (x, y) in enumerate(DataLoader(data, batch_size=BATCH)):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = mse(reference, x, y) / 2
        scaler.scale(loss).backward()
        if index % 2 == 1:
            scaler.step(ref_opt)
            scaler.update()
            ref_opt.zero_grad()
    ref_state = ref_opt.state_dict()
    ref_opt.load_state_dict(ref_state)

    events: list[Any] = []
    accelerator = cpu_accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=BATCH))
    _hooked(opt, events, where)
    for index, (x, y) in enumerate(loader):  # noqa: B007
        with accelerator.accumulate(model), accelerator.autocast():
            accelerator.backward(mse(model, x, y))
            opt.step()
            opt.zero_grad()
    state = opt.state_dict()
    assert state["hooked"] is True
    opt.load_state_dict(state)

    if fp16:
        assert ("step_pre", 1) not in ref_events  # the overflowing first window was skipped
    assert events == ref_events
    assert_same_weights(model, reference, exact=not fp16)


def test_add_param_group_after_prepare_trains_the_new_group() -> None:
    data = dataset(3)
    model, reference = twins(12)

    ref_opt = torch.optim.SGD(reference[0].parameters(), lr=0.1)
    ref_opt.add_param_group({"params": list(reference[2].parameters()), "lr": 0.05})
    for x, y in DataLoader(data, batch_size=BATCH):
        mse(reference, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    accelerator = cpu_accelerator()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=BATCH))
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
    assert len(opt.param_groups) == 2
    for x, y in loader:
        accelerator.backward(mse(model, x, y))
        opt.step()
        opt.zero_grad()

    assert not torch.equal(model[2].weight, mlp(12)[2].weight)  # the new group moved
    assert_same_weights(model, reference)


# --- 7. a prepared model's forward runs under autocast ----------------------------------------


@pytest.mark.parametrize(
    ("mixed_precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_prepared_forward_runs_under_autocast(mixed_precision: str, dtype: torch.dtype) -> None:
    x, y = dataset(1).tensors
    model, reference = twins(13)

    with torch.autocast("cpu", dtype=dtype):
        ref_out = reference(x)
    assert ref_out.dtype == dtype
    ref_out = ref_out.float()

    accelerator = cpu_accelerator(mixed_precision=mixed_precision)
    model = accelerator.prepare(model)
    inner: list[torch.dtype] = []
    accelerator.unwrap_model(model)[0].register_forward_hook(
        lambda module, args, output: inner.append(output.dtype)
    )
    out = model(x)  # no accelerator.autocast() around it

    assert inner == [dtype]
    assert out.dtype == torch.float32
    assert torch.equal(out, ref_out)
    assert accelerator.unwrap_model(model)[0].weight.dtype == torch.float32

    if mixed_precision == "bf16":  # no loss scaling: the gradients match plain autocast exactly
        F.mse_loss(ref_out, y).backward()
        accelerator.backward(F.mse_loss(out, y))
        for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(mine.grad, theirs.grad)  # type: ignore[arg-type]


# --- 8. the AMP recipe for several models, with accumulation -----------------------------------


class GanPair:
    """A small generator and discriminator, with their seeded initial weights."""

    latent = 3

    def __init__(self) -> None:
        torch.manual_seed(14)
        self.gen = nn.Sequential(nn.Linear(self.latent, 8), nn.LeakyReLU(0.2), nn.Linear(8, 2))
        # LeakyReLU, not Tanh: a saturated Tanh would hide the big batch from the gradient.
        self.disc = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))


def gan_data(batches: int) -> tuple[TensorDataset, list[Tensor]]:
    """Real 2-D points and one noise batch per step, drawn up front so both loops use the
    same noise. The first noise batch is huge: the discriminator scores those fakes as very
    real, and their scaled fp16 gradient overflows."""
    generator = torch.Generator().manual_seed(15)
    real = 0.5 * torch.randn(batches * BATCH, 2, generator=generator) + 1.0
    noise = [torch.randn(BATCH, GanPair.latent, generator=generator) for _ in range(batches)]
    noise[0] = 1000.0 * noise[0]
    return TensorDataset(real), noise


def bce(logits: Tensor, target: float) -> Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_gan_two_optimizers_with_accumulation_matches_the_amp_recipe(
    mixed_precision: str,
) -> None:
    """Discriminator step, then generator step, each clipping its own model, accumulating
    over 2 batches, under one GradScaler: the same as plain torch.amp by hand."""
    fp16 = mixed_precision == "fp16"
    steps = 2
    data, noise = gan_data(6)
    ours, ref = GanPair(), GanPair()

    # Plain PyTorch, accumulation by hand: loss / 2, step every 2 batches, one update() per
    # iteration that stepped (the recipe: unscale_, clip, step per optimizer, then update).
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    ref_opt_d = torch.optim.Adam(ref.disc.parameters(), lr=1e-2)
    ref_opt_g = torch.optim.Adam(ref.gen.parameters(), lr=1e-2)
    ref_scales = []
    for index, (real,) in enumerate(DataLoader(data, batch_size=BATCH)):
        sync = index % steps == steps - 1
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            fake = ref.gen(noise[index])
            d_loss = bce(ref.disc(real), 1.0) + bce(ref.disc(fake.detach()), 0.0)
        scaler.scale(d_loss / steps).backward()
        if sync:
            scaler.unscale_(ref_opt_d)
            clip(ref.disc)
            scaler.step(ref_opt_d)
            ref_opt_d.zero_grad()
        ref.disc.requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            g_loss = bce(ref.disc(fake), 1.0)
        scaler.scale(g_loss / steps).backward()
        ref.disc.requires_grad_(True)
        if sync:
            scaler.unscale_(ref_opt_g)
            clip(ref.gen)
            scaler.step(ref_opt_g)
            ref_opt_g.zero_grad()
            scaler.update()
            ref_scales.append(scaler.get_scale())
    if fp16:
        assert ref_scales == [INIT_SCALE / 2] * 3  # the first window overflowed, once

    accelerator = cpu_accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=2)
    opt_d = torch.optim.Adam(ours.disc.parameters(), lr=1e-2)
    opt_g = torch.optim.Adam(ours.gen.parameters(), lr=1e-2)
    gen, disc, opt_g, opt_d, loader = accelerator.prepare(
        ours.gen, ours.disc, opt_g, opt_d, DataLoader(data, batch_size=BATCH)
    )
    for index, (real,) in enumerate(loader):
        with accelerator.accumulate(gen, disc):
            with accelerator.autocast():
                fake = gen(noise[index])
                d_loss = bce(disc(real), 1.0) + bce(disc(fake.detach()), 0.0)
            accelerator.backward(d_loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(disc.parameters(), 1.0)
            opt_d.step()
            opt_d.zero_grad()
            disc.requires_grad_(False)
            with accelerator.autocast():
                g_loss = bce(disc(fake), 1.0)
            accelerator.backward(g_loss)
            disc.requires_grad_(True)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(gen.parameters(), 1.0)
            opt_g.step()
            opt_g.zero_grad()
    accelerator.end_training()

    assert_same_weights(gen, ref.gen, exact=not fp16)
    assert_same_weights(disc, ref.disc, exact=not fp16)
    if fp16:
        assert scale_of(accelerator) == ref_scales[-1]


def test_iterator_drawn_at_epoch_end_leaves_the_next_epoch_alone() -> None:
    """A validation iterator kept open and drawn once at each epoch's end: the next epoch's
    windows are still the training loader's, and its last batch is the end of the loader."""
    accelerator = cpu_accelerator(gradient_accumulation_steps=2)
    model = mlp(0)
    train_loader, val_loader = accelerator.prepare(
        DataLoader(dataset(6), batch_size=BATCH), DataLoader(dataset(10, seed=1), batch_size=BATCH)
    )
    val_iter = iter(val_loader)
    for _ in range(3):
        syncs, ends = [], []
        for _batch in train_loader:
            with accelerator.accumulate(model):
                syncs.append((accelerator.sync_gradients, accelerator.gradient_state.window_size))
                ends.append(accelerator.gradient_state.end_of_dataloader)
        next(val_iter)
        assert syncs == [(False, 2), (True, 2)] * 3
        assert ends == [False] * 5 + [True]


def test_a_new_pass_of_the_loader_takes_the_windows_from_an_abandoned_iterator() -> None:
    """An iterator left half-way through a window (still referenced) does not keep the
    windows: a new pass of the same loader starts them afresh."""
    accelerator = cpu_accelerator(gradient_accumulation_steps=2)
    model = mlp(0)
    loader = accelerator.prepare(DataLoader(dataset(10), batch_size=BATCH))
    abandoned = iter(loader)
    for _ in range(3):
        next(abandoned)
        with accelerator.accumulate(model):
            pass
    syncs = []
    for _batch in loader:
        with accelerator.accumulate(model):
            syncs.append(accelerator.sync_gradients)
    assert syncs == [False, True] * 5
    del abandoned


@pytest.mark.parametrize("steps", [1, 2])
def test_end_of_dataloader_follows_the_training_loader_with_an_iterator_opened_inside(
    steps: int,
) -> None:
    accelerator = cpu_accelerator(gradient_accumulation_steps=steps)
    model = mlp(0)
    train_loader, val_loader = accelerator.prepare(
        DataLoader(dataset(6), batch_size=BATCH), DataLoader(dataset(20, seed=1), batch_size=BATCH)
    )
    val_iter: Iterator[Any] | None = None
    ends = []
    for _batch in train_loader:
        if val_iter is None:
            val_iter = iter(val_loader)
        next(val_iter)
        with accelerator.accumulate(model):
            ends.append(accelerator.gradient_state.end_of_dataloader)
    assert ends == [False] * 5 + [True]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_prepared_model_keeps_autocast_and_uses_its_own_weights(how: str) -> None:
    import pickle

    accelerator = cpu_accelerator(mixed_precision="bf16")
    model = accelerator.prepare(nn.Sequential(nn.Linear(4, 3)))
    copied = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        copied[0].weight.add_(1.0)
    x = torch.randn(2, 4)
    seen = []
    copied[0].register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, copied[0].weight, copied[0].bias).float()
    assert torch.equal(copied(x), expected)  # the copy's weights, under autocast
    assert seen == [torch.bfloat16]
    assert not torch.equal(model(x), expected)  # the original is untouched
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(compiled(x), model(x))
