"""Manual optimization in the Trainer, each case against plain PyTorch doing the same updates.

A module with ``self.automatic_optimization = False`` steps its optimizers itself in
``training_step``: ``self.optimizers()``, ``self.lr_schedulers()``, ``self.manual_backward``,
``self.clip_gradients``, ``toggle_optimizer`` / ``untoggle_optimizer``. The reference runs
the same seeded networks on the same batches written by hand (``torch.amp.GradScaler``, one
``torch.autocast(cache_enabled=False)`` region per step and ``scaler.update()`` after each
optimizer step for fp16, as Lightning does). Both give bit-identical weights, fp16 runs the
same loss scale too (CPU fp16: the same casts in the same order).

Pinned here: accumulation windows in manual mode (``step`` / ``zero_grad`` / clipping wait
for the window's end, the loss is divided by the window's size, ``num_items`` normalises by
the window's items), ``global_step`` counting batches in which an optimizer stepped, the
user's schedulers, the accepted ``configure_optimizers`` forms, the hooks around
``manual_backward`` and each real optimizer step, and the errors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ember import Callback, Trainer, TrainModule
from ember.accelerator.optim import AcceleratedOptimizer
from ember.errors import MisconfigurationError
from tests.helpers import TinyModule, bare_trainer_kwargs, loader

LATENT = 4
BATCH = 4
# PyTorch's default GradScaler settings, which the Trainer's fp16 precision uses too.
INIT_SCALE = 2.0**16
CLIP = 0.05  # small enough that every step's gradient is really clipped


# --- data and networks -------------------------------------------------------------------------


def gan_data(batches: int, big: tuple[int, ...] = (), seed: int = 0) -> TensorDataset:
    """``batches`` batches of (real 2-D point, generator noise).

    The noise is part of the data, so ember and the reference draw nothing at random. Batches
    in ``big`` hold points 10^6 times larger (beyond fp16's range): the discriminator's gradient
    overflows there, so the GradScaler skips its step and halves the scale.
    """
    generator = torch.Generator().manual_seed(seed)
    real = 0.5 * torch.randn(batches * BATCH, 2, generator=generator) + 1.0
    noise = torch.randn(batches * BATCH, LATENT, generator=generator)
    for index in big:
        real[index * BATCH : (index + 1) * BATCH] *= 1e6
    return TensorDataset(real, noise)


def gan_loader(batches: int, big: tuple[int, ...] = ()) -> DataLoader:
    return DataLoader(gan_data(batches, big), batch_size=BATCH, shuffle=False)


def gan_nets(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(seed)
    generator = nn.Sequential(nn.Linear(LATENT, 8), nn.Tanh(), nn.Linear(8, 2))
    discriminator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    return generator, discriminator


def gan_optimizers(
    generator: nn.Module, discriminator: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    return (
        torch.optim.Adam(generator.parameters(), lr=0.01, betas=(0.5, 0.999)),
        torch.optim.SGD(discriminator.parameters(), lr=0.05, momentum=0.9),
    )


def bce(logits: Tensor, real: bool) -> Tensor:
    logits = logits.float()  # the loss in float32 on both sides
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def d_loss_of(
    generator: nn.Module, discriminator: nn.Module, real: Tensor, noise: Tensor
) -> Tensor:
    fake = generator(noise).detach()
    return bce(discriminator(real), True) + bce(discriminator(fake), False)


def g_loss_of(generator: nn.Module, discriminator: nn.Module, noise: Tensor) -> Tensor:
    return bce(discriminator(generator(noise)), True)


class GAN(TrainModule):
    """Each batch: the discriminator's step, then the generator's with ``opt_g`` toggled.

    Records what the tests look at: the markers of ``events`` (the hooks add theirs), the
    discriminator's ``requires_grad`` and gradients during the generator's step.
    """

    def __init__(self, clip_val: float | None = CLIP) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.discriminator = gan_nets()
        self.clip_val = clip_val
        self.events: list[str] = []
        self.d_requires_grad_in_g_step: list[list[bool]] = []
        self.g_requires_grad_in_g_step: list[list[bool]] = []
        self.d_grad_is_none_after_g_backward: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, noise = batch
        opt_g, opt_d = self.optimizers()

        d_loss = d_loss_of(self.generator, self.discriminator, real, noise)
        self.manual_backward(d_loss)
        self.clip_gradients(opt_d, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        self.events.append("clip d")
        opt_d.step()
        opt_d.zero_grad()

        self.toggle_optimizer(opt_g)
        self.d_requires_grad_in_g_step.append(
            [p.requires_grad for p in self.discriminator.parameters()]
        )
        self.g_requires_grad_in_g_step.append(
            [p.requires_grad for p in self.generator.parameters()]
        )
        g_loss = g_loss_of(self.generator, self.discriminator, noise)
        self.manual_backward(g_loss)
        self.d_grad_is_none_after_g_backward.append(
            all(p.grad is None for p in self.discriminator.parameters())
        )
        self.clip_gradients(opt_g, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        self.events.append("clip g")
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self) -> Any:
        return list(gan_optimizers(self.generator, self.discriminator))


def plain_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    batches: DataLoader,
    clip_val: float = CLIP,
    fp16: bool = False,
    accumulate: int = 1,
) -> list[float]:
    """The GAN's updates in plain PyTorch (fp16: ``scaler.update()`` after each optimizer
    step that leaves no other gradient to step, as ember's manual optimization does);
    returns the loss scale after each batch."""
    opt_g, opt_d = gan_optimizers(generator, discriminator)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    total = len(batches)
    scales = []
    for index, (real, noise) in enumerate(batches):
        window_start = index - index % accumulate
        window = min(accumulate, total - window_start)  # a short last window: its own size
        closes = index + 1 == window_start + window
        # ember runs the whole training_step under one autocast region, without the cache
        # of weight casts (the discriminator's weights change in the middle of it).
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16, cache_enabled=False):
            d_loss = d_loss_of(generator, discriminator, real, noise) / window
            scaler.scale(d_loss).backward()
            if closes:
                scaler.unscale_(opt_d)
                nn.utils.clip_grad_norm_(list(discriminator.parameters()), clip_val)
                scaler.step(opt_d)
                # The generator's gradient of the open window (accumulate > 1) was scaled
                # with the current scale: the update waits until it is stepped too.
                if all(p.grad is None for p in generator.parameters()):
                    scaler.update()
                opt_d.zero_grad()
            for parameter in discriminator.parameters():
                parameter.requires_grad_(False)
            g_loss = g_loss_of(generator, discriminator, noise) / window
            scaler.scale(g_loss).backward()
            if closes:
                scaler.unscale_(opt_g)
                nn.utils.clip_grad_norm_(list(generator.parameters()), clip_val)
                scaler.step(opt_g)
                scaler.update()
                opt_g.zero_grad()
            for parameter in discriminator.parameters():
                parameter.requires_grad_(True)
        scales.append(scaler.get_scale() if fp16 else 1.0)
    return scales


def assert_same_weights(module: nn.Module, reference: nn.Module) -> None:
    """Bit-identical weights (and buffers)."""
    for (name, mine), theirs in zip(
        module.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), (
            f"{name}: max difference {(mine - theirs).abs().max().item():.3g}"
        )


def fit(module: TrainModule, data: Any, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_epochs", 1)
    trainer = Trainer(num_sanity_val_steps=0, **kwargs, **bare_trainer_kwargs())
    trainer.fit(module, data)
    return trainer


def twins(module: GAN) -> tuple[nn.Module, nn.Module]:
    """Copies of the module's networks as they are before fit, for the reference."""
    return copy.deepcopy(module.generator), copy.deepcopy(module.discriminator)


def adam_steps(optimizer: Any) -> int:
    """How many real steps an Adam optimizer took."""
    states = list(optimizer.state.values())
    return int(states[0]["step"]) if states else 0


# --- 1. a GAN against plain PyTorch ------------------------------------------------------------


def test_gan_fp32_equals_plain_pytorch_exactly() -> None:
    module = GAN()
    ref_g, ref_d = twins(module)
    trainer = fit(module, gan_loader(5))
    plain_gan(ref_g, ref_d, gan_loader(5))
    assert trainer.global_step == 5
    assert_same_weights(module.generator, ref_g)
    assert_same_weights(module.discriminator, ref_d)
    # Both networks really moved.
    start_g, start_d = gan_nets()
    assert not torch.equal(module.generator[0].weight, start_g[0].weight)
    assert not torch.equal(module.discriminator[0].weight, start_d[0].weight)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gan_fp16_equals_plain_torch_amp_and_the_loss_scale(accumulate: int) -> None:
    # The first and the last batch overflow: the scale halves twice.
    big = (0, 4)
    module = GAN()
    ref_g, ref_d = twins(module)
    ref_scales = plain_gan(ref_g, ref_d, gan_loader(5, big), fp16=True, accumulate=accumulate)
    # The reference saw both overflows: each halved the scale once (one update per window,
    # however many optimizers stepped).
    assert ref_scales[-2:] == [INIT_SCALE / 2, INIT_SCALE / 4]

    trainer = fit(
        module, gan_loader(5, big), precision="16-mixed", accumulate_grad_batches=accumulate
    )
    assert trainer.global_step == (5 if accumulate == 1 else 3)  # skipped steps count
    # Bit-identical to torch.amp: the same casts, the same scale, each optimizer unscaled
    # once. The discriminator's steps on the big batches were skipped (as the reference's),
    # the generator's were not.
    assert_same_weights(module.generator, ref_g)
    assert_same_weights(module.discriminator, ref_d)
    assert adam_steps(trainer.optimizers[0]) == trainer.global_step
    # The scale after the last window's update (the last batch overflowed): fit applies the
    # update the last window left pending before it returns.
    scaler = trainer.accelerator.precision.scaler  # type: ignore[attr-defined]
    assert scaler.get_scale() == ref_scales[-1] == INIT_SCALE / 4


def test_gan_with_accumulation_equals_plain_pytorch_exactly() -> None:
    # 5 batches, windows of 2: [0, 1], [2, 3] and the short [4], divided by its own size.
    module = GAN()
    ref_g, ref_d = twins(module)
    trainer = fit(module, gan_loader(5), accumulate_grad_batches=2)
    plain_gan(ref_g, ref_d, gan_loader(5), accumulate=2)
    assert trainer.global_step == 3
    assert adam_steps(trainer.optimizers[0]) == 3
    assert_same_weights(module.generator, ref_g)
    assert_same_weights(module.discriminator, ref_d)


# --- 2. accumulation with one optimizer --------------------------------------------------------


class ManualRegression(TrainModule):
    """An MLP regression stepped by hand; records, per batch, what the step did.

    ``summed``: backpropagate the summed loss with ``num_items`` (the batch's size).
    """

    def __init__(self, clip_val: float | None = CLIP, summed: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.clip_val = clip_val
        self.summed = summed
        #: Per batch: the gradient norm just after clip_gradients, whether step() changed the
        #: weights, whether zero_grad() left the gradient in place.
        self.norm_after_clip: list[float] = []
        self.moved: list[bool] = []
        self.grad_kept: list[bool] = []

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).float(), y, reduction="sum" if self.summed else "mean")

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = self.loss(batch)
        if self.summed:
            self.manual_backward(loss, num_items=batch[0].shape[0])
        else:
            self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        self.norm_after_clip.append(grad_norm(self.net))
        before = [p.detach().clone() for p in self.net.parameters()]
        opt.step()
        self.moved.append(
            any(not torch.equal(b, p) for b, p in zip(before, self.net.parameters(), strict=True))
        )
        opt.zero_grad()
        self.grad_kept.append(all(p.grad is not None for p in self.net.parameters()))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def regression_batches(sizes: list[int], seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Micro-batches of the given sizes (a list of batches is a loader with a length)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, 4, generator=generator)
    y = x @ torch.randn(4, 1, generator=generator) + 0.1 * torch.randn(
        total, 1, generator=generator
    )
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def plain_accumulation(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    accumulate: int,
    clip_val: float | None = CLIP,
    summed: bool = False,
) -> None:
    """Plain PyTorch: per window, backward of loss / window size (or of the summed loss, the
    gradient then divided by the window's item count), clip, step, zero."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for start in range(0, len(batches), accumulate):
        window = batches[start : start + accumulate]
        for x, y in window:
            if summed:
                F.mse_loss(model(x), y, reduction="sum").backward()
            else:
                (F.mse_loss(model(x), y) / len(window)).backward()
        if summed:
            items = sum(x.shape[0] for x, _ in window)
            for parameter in model.parameters():
                parameter.grad.div_(items)
        if clip_val is not None:
            nn.utils.clip_grad_norm_(list(model.parameters()), clip_val)
        opt.step()
        opt.zero_grad()


class Stream(IterableDataset):
    """Batches from an iterable without a length: the loop learns of the last batch only
    when it arrives."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)


@pytest.mark.parametrize(
    ("batches", "unknown_length"),
    [(6, False), (5, False), (5, True)],
    ids=["even", "odd-short-last-window", "odd-unknown-length"],
)
def test_accumulation_steps_zeroes_and_clips_at_the_window_end(
    batches: int, unknown_length: bool
) -> None:
    data = regression_batches([4] * batches)
    module = ManualRegression()
    reference = copy.deepcopy(module.net)
    source: Any = DataLoader(Stream(data), batch_size=None) if unknown_length else data
    trainer = fit(module, source, accumulate_grad_batches=2)
    plain_accumulation(reference, data, accumulate=2)
    assert_same_weights(module.net, reference)
    windows = (batches + 1) // 2
    assert trainer.global_step == windows
    ends = [index % 2 == 1 or index == batches - 1 for index in range(batches)]
    # step() and zero_grad() did nothing inside a window...
    assert module.moved == ends
    assert module.grad_kept == [not end for end in ends]
    # ...and clip_gradients clipped only at its end (the open window's gradient is larger).
    for end, norm in zip(ends, module.norm_after_clip, strict=True):
        assert norm == pytest.approx(CLIP, rel=1e-4) if end else norm > 2 * CLIP


def test_accumulation_divides_the_loss_by_the_window_size() -> None:
    # Without clipping the division is visible in the step itself: 3 batches with windows
    # of 2 and a short 1 equal plain accumulation of loss / 2 and then loss / 1.
    data = regression_batches([4] * 3)
    module = ManualRegression(clip_val=None)
    reference = copy.deepcopy(module.net)
    fit(module, data, accumulate_grad_batches=2)
    plain_accumulation(reference, data, accumulate=2, clip_val=None)
    assert_same_weights(module.net, reference)
    # Dividing the short window by 2 (or not dividing the full ones) would differ.
    wrong = copy.deepcopy(module.net)
    plain_accumulation(wrong, data, accumulate=1, clip_val=None)
    assert not torch.equal(wrong[0].weight, module.net[0].weight)


@pytest.mark.parametrize("clip_val", [None, CLIP], ids=["no-clip", "clip"])
def test_num_items_normalises_by_the_window_total(clip_val: float | None) -> None:
    # Unequal micro-batches; windows of 3: 2+7+3 = 12 items, then the short 5+1 = 6.
    data = regression_batches([2, 7, 3, 5, 1])
    module = ManualRegression(clip_val=clip_val, summed=True)
    reference = copy.deepcopy(module.net)
    trainer = fit(module, data, accumulate_grad_batches=3)
    plain_accumulation(reference, data, accumulate=3, clip_val=clip_val, summed=True)
    assert trainer.global_step == 2
    # ember multiplies by 1 / items where the reference divides: equal to rounding.
    for got, expected in zip(module.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    if clip_val is not None:  # the clip saw the normalised gradient, at the window's end only
        assert module.norm_after_clip[2] == pytest.approx(CLIP, rel=1e-4)
        assert module.norm_after_clip[4] == pytest.approx(CLIP, rel=1e-4)


# --- 3. global_step ----------------------------------------------------------------------------


class CountBatches(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.steps.append(trainer.global_step)


def test_global_step_counts_batches_not_optimizer_steps() -> None:
    # Two optimizers step per batch; max_steps=5 runs 5 batches (Lightning: 3, since it
    # counts every optimizer's step: a documented difference).
    counter = CountBatches()
    trainer = fit(GAN(), gan_loader(8), max_steps=5, max_epochs=None, callbacks=[counter])
    assert trainer.global_step == 5
    assert counter.steps == [1, 2, 3, 4, 5]
    opt_g, opt_d = trainer.optimizers
    assert adam_steps(opt_g) == 5
    assert all(state["momentum_buffer"] is not None for state in opt_d.state.values())


def test_a_batch_without_an_optimizer_step_does_not_count() -> None:
    class StepsSometimes(ManualRegression):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            self.manual_backward(self.loss(batch))
            if batch_idx in (1, 2, 5):
                opt.step()
            opt.zero_grad()

    counter = CountBatches()
    trainer = fit(StepsSometimes(), regression_batches([4] * 6), callbacks=[counter])
    assert counter.steps == [0, 1, 2, 2, 2, 3]
    assert trainer.global_step == 3


def test_global_step_with_accumulation() -> None:
    counter = CountBatches()
    trainer = fit(GAN(), gan_loader(6), accumulate_grad_batches=2, callbacks=[counter])
    assert trainer.global_step == 3
    assert counter.steps == [0, 1, 1, 2, 2, 3]
    assert adam_steps(trainer.optimizers[0]) == 3


# --- 4. schedulers -----------------------------------------------------------------------------


class WithScheduler(ManualRegression):
    """Steps the optimizer each batch and the scheduler on the batches in ``step_at``."""

    def __init__(self, interval: str = "epoch", step_at: tuple[int, ...] = ()) -> None:
        super().__init__(clip_val=None)
        self.interval = interval
        self.step_at = step_at
        self.made: list[Any] = []
        self.got: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        sch = self.lr_schedulers()
        self.got.append(sch)
        self.manual_backward(self.loss(batch))
        opt.step()
        opt.zero_grad()
        if batch_idx in self.step_at:
            sch.step()

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        sch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        self.made = [opt, sch]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": self.interval}}


def plain_lr_after(calls: int) -> float:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(calls):
        opt.step()
        sch.step()
    return float(sch.get_last_lr()[0])


def test_lr_schedulers_returns_the_scheduler_and_each_call_advances_once() -> None:
    module = WithScheduler(step_at=(0, 1, 3))
    fit(module, regression_batches([4] * 4))
    opt, sch = module.made
    assert all(got is sch for got in module.got)  # the user's scheduler, one object
    assert sch.last_epoch == 3
    assert opt.param_groups[0]["lr"] == plain_lr_after(3) == 0.1 * 0.5**3


def test_each_scheduler_call_advances_once_inside_accumulation_windows() -> None:
    # Lightning's convention: the user's scheduler advances at each call, even where the
    # optimizer's step() waited for the window's end (batch 2 is mid-window).
    module = WithScheduler(step_at=(1, 2, 3))
    trainer = fit(module, regression_batches([4] * 4), accumulate_grad_batches=2)
    assert trainer.global_step == 2
    assert module.made[1].last_epoch == 3
    assert module.made[0].param_groups[0]["lr"] == plain_lr_after(3)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_the_trainer_does_not_step_schedulers_in_manual_mode(interval: str) -> None:
    module = WithScheduler(interval=interval)
    trainer = fit(module, regression_batches([4] * 3), max_epochs=2)
    assert trainer.global_step == 6
    opt, sch = module.made
    assert sch.last_epoch == 0
    assert opt.param_groups[0]["lr"] == 0.1


def test_lr_schedulers_lists_several_and_none_without() -> None:
    seen: list[Any] = []

    class TwoSchedulers(GAN):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            seen.append(self.lr_schedulers())
            super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            opt_g, opt_d = gan_optimizers(self.generator, self.discriminator)
            self.made = [
                torch.optim.lr_scheduler.StepLR(opt_g, step_size=1),
                torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.9),
            ]
            return [opt_g, opt_d], self.made

    module = TwoSchedulers()
    fit(module, gan_loader(1))
    assert isinstance(seen[0], list) and len(seen[0]) == 2
    assert seen[0][0] is module.made[0] and seen[0][1] is module.made[1]

    class NoScheduler(GAN):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            seen.append(self.lr_schedulers())
            super().training_step(batch, batch_idx)

    fit(NoScheduler(), gan_loader(1))
    assert seen[-1] is None


# --- 5. optimizers() ---------------------------------------------------------------------------


def test_optimizers_returns_the_prepared_wrappers() -> None:
    seen: list[Any] = []

    class One(ManualRegression):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            seen.append(self.optimizers())
            super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            self.made = torch.optim.SGD(self.net.parameters(), lr=0.1)
            return self.made

    module = One()
    trainer = fit(module, regression_batches([4] * 2))
    assert len(seen) == 2 and seen[0] is seen[1]
    one = seen[0]
    assert isinstance(one, AcceleratedOptimizer) and isinstance(one, torch.optim.Optimizer)
    assert one.optimizer is module.made
    assert trainer.optimizers == [one]

    class Two(GAN):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            seen.append(self.optimizers())
            super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            self.made = gan_optimizers(self.generator, self.discriminator)
            return list(self.made)

    module = Two()
    trainer = fit(module, gan_loader(1))
    two = seen[-1]
    assert isinstance(two, list) and len(two) == 2
    assert all(isinstance(item, torch.optim.Optimizer) for item in two)
    assert [item.optimizer for item in two] == list(module.made)
    assert trainer.optimizers == two


# --- 6. errors ---------------------------------------------------------------------------------


def test_several_optimizers_need_manual_optimization() -> None:
    class TwoAutomatic(TinyModule):
        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.Adam(self.parameters())]

    with pytest.raises(MisconfigurationError, match="automatic_optimization = False"):
        fit(TwoAutomatic(), loader(16))


def test_trainer_clipping_is_refused_in_manual_mode() -> None:
    with pytest.raises(MisconfigurationError, match=r"self\.clip_gradients"):
        fit(GAN(), gan_loader(1), gradient_clip_val=1.0)
    # None and 0 mean no clipping: accepted.
    fit(GAN(), gan_loader(1), gradient_clip_val=0)


def failing_step(action: Callable[[ManualRegression, Any], None]) -> type[ManualRegression]:
    class Failing(ManualRegression):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            self.manual_backward(self.loss(batch))
            action(self, self.optimizers())

    return Failing


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (
            lambda m, opt: m.clip_gradients(torch.optim.SGD(m.parameters(), lr=0.1), 1.0),
            r"not one of self\.optimizers\(\)",
        ),
        (
            lambda m, opt: m.clip_gradients(opt, 1.0, gradient_clip_algorithm="max"),
            r"gradient_clip_algorithm='max'.*'norm', 'value'",
        ),
        (lambda m, opt: m.clip_gradients(opt, -1.0), r"gradient_clip_val=-1\.0"),
    ],
    ids=["foreign-optimizer", "bad-algorithm", "negative-value"],
)
def test_clip_gradients_errors(action: Any, message: str) -> None:
    with pytest.raises(MisconfigurationError, match=message):
        fit(failing_step(action)(), regression_batches([4]))


def test_clip_gradients_accepts_the_real_optimizer_and_value_clipping() -> None:
    class RealOptimizer(ManualRegression):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            self.manual_backward(self.loss(batch))
            self.clip_gradients(opt.optimizer, 1e-3, gradient_clip_algorithm="value")
            self.largest = max(float(p.grad.abs().max()) for p in self.net.parameters())
            opt.step()
            opt.zero_grad()

    module = RealOptimizer()
    fit(module, regression_batches([4]))
    assert module.largest == pytest.approx(1e-3)


def test_manual_backward_outside_a_trainer_run() -> None:
    module = ManualRegression()
    loss = module.loss(regression_batches([4])[0])
    with pytest.raises(MisconfigurationError, match="not attached to a Trainer"):
        module.manual_backward(loss)
    with pytest.raises(MisconfigurationError, match="not attached to a Trainer"):
        module.optimizers()


# --- 7. configure_optimizers forms -------------------------------------------------------------


def optimizer_forms(module: GAN) -> dict[str, Any]:
    opt_g, opt_d = gan_optimizers(module.generator, module.discriminator)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=1)
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=1)
    return {
        "list": ([opt_g, opt_d], []),
        "lists": (([opt_g, opt_d], [sched_g, sched_d]), [sched_g, sched_d]),
        "dicts": (
            [
                {"optimizer": opt_g, "lr_scheduler": sched_g},
                {"optimizer": opt_d, "lr_scheduler": {"scheduler": sched_d, "interval": "step"}},
            ],
            [sched_g, sched_d],
        ),
    }


@pytest.mark.parametrize("form", ["list", "lists", "dicts"])
def test_configure_optimizers_forms_with_several_optimizers(form: str) -> None:
    class Form(GAN):
        def configure_optimizers(self) -> Any:
            returned, self.schedulers = optimizer_forms(self)[form]
            self.made = [self.generator, self.discriminator]
            return returned

    module = Form()
    ref_g, ref_d = twins(module)
    trainer = fit(module, gan_loader(2))
    plain_gan(ref_g, ref_d, gan_loader(2))
    assert trainer.global_step == 2
    assert len(trainer.optimizers) == 2
    assert [config.scheduler.scheduler for config in trainer.lr_scheduler_configs] == (
        module.schedulers
    )
    # The optimizers are in order (generator first) and both stepped as in plain PyTorch.
    assert_same_weights(module.generator, ref_g)
    assert_same_weights(module.discriminator, ref_d)
    # The Trainer stepped none of the schedulers.
    assert all(sch.last_epoch == 0 for sch in module.schedulers)


# --- 8. hooks ----------------------------------------------------------------------------------


class Recorder(Callback):
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def on_before_backward(self, trainer: Any, module: Any, loss: Tensor) -> None:
        self.events.append("callback before_backward")

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        name = "g" if optimizer is trainer.optimizers[0] else "d"
        self.events.append(f"callback before_optimizer_step {name}")


class HookedGAN(GAN):
    def on_before_backward(self, loss: Tensor) -> None:
        self.events.append("before_backward")

    def on_after_backward(self) -> None:
        self.events.append("after_backward")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        opt_g, opt_d = self.optimizers()
        assert optimizer is opt_g or optimizer is opt_d
        self.events.append(f"before_optimizer_step {'g' if optimizer is opt_g else 'd'}")

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self.events.append("before_zero_grad")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.events.append(f"batch {batch_idx}")


def test_hooks_around_manual_backward_and_each_real_step() -> None:
    module = HookedGAN()
    fit(module, gan_loader(2), callbacks=[Recorder(module.events)])
    one_batch = [
        "callback before_backward",
        "before_backward",
        "after_backward",
        "clip d",  # the user's clipping comes first: the hook fires inside step()
        "callback before_optimizer_step d",
        "before_optimizer_step d",
        "callback before_backward",
        "before_backward",
        "after_backward",
        "clip g",
        "callback before_optimizer_step g",
        "before_optimizer_step g",
    ]
    # on_before_zero_grad is automatic optimization's: not fired in manual mode.
    assert module.events == ["batch 0", *one_batch, "batch 1", *one_batch]


def test_on_before_optimizer_step_fires_once_per_window() -> None:
    module = HookedGAN()
    fit(module, gan_loader(4), accumulate_grad_batches=2)
    steps = [event for event in module.events if event.startswith("before_optimizer_step")]
    assert steps == ["before_optimizer_step d", "before_optimizer_step g"] * 2
    assert module.events.count("before_backward") == 8
    assert module.events.count("after_backward") == 8


def test_on_before_optimizer_step_sees_the_unscaled_fp16_gradient() -> None:
    class Grads(ManualRegression):
        def __init__(self) -> None:
            super().__init__(clip_val=None)
            self.seen: list[tuple[int, list[Tensor]]] = []

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.batch_idx = batch_idx

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.seen.append((self.batch_idx, [p.grad.clone() for p in self.net.parameters()]))

    # Small targets keep the scaled fp16 gradient finite, except on the first batch: 10^4
    # times larger, it overflows and the GradScaler skips that step.
    data = [(x, 0.1 * y) for x, y in regression_batches([4] * 4)]
    data[0] = (data[0][0] * 1e4, data[0][1] * 1e4)
    module = Grads()
    reference = copy.deepcopy(module.net)
    fit(module, data, precision="16-mixed")

    # Plain torch.amp, recording the gradient after unscale_ of the steps that ran.
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    expected = []
    for index, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.float16):
            scaler.scale(F.mse_loss(reference(x).float(), y)).backward()
            scaler.unscale_(opt)
            grads = [p.grad.clone() for p in reference.parameters()]
            if all(g.isfinite().all() for g in grads):
                expected.append((index, grads))
            scaler.step(opt)
            opt.zero_grad()
        scaler.update()
    assert [index for index, _ in expected] == [1, 2, 3]  # the reference skipped batch 0
    # The hook fires before each real step only (not for the step fp16 skipped), and sees the
    # gradient unscaled: equal to plain torch.amp's after unscale_, not 2**15 times larger.
    assert [index for index, _ in module.seen] == [1, 2, 3]
    for (_, mine), (_, theirs) in zip(module.seen, expected, strict=True):
        for got, want in zip(mine, theirs, strict=True):
            assert torch.equal(got, want)
    assert_same_weights(module.net, reference)


def test_automatic_optimization_false_means_no_backward_from_the_trainer() -> None:
    class ReturnsLoss(ManualRegression):
        backwards = 0

        def on_before_backward(self, loss: Tensor) -> None:
            self.backwards += 1

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.loss(batch)  # a loss with a gradient, and no backward or step

    module = ReturnsLoss()
    before = copy.deepcopy(module.net)
    trainer = fit(module, regression_batches([4] * 3))
    assert trainer.global_step == 0
    assert module.backwards == 0
    assert all(p.grad is None for p in module.net.parameters())
    assert_same_weights(module.net, before)


# --- 9. toggle_optimizer -----------------------------------------------------------------------


def test_toggle_optimizer_freezes_the_other_optimizers_parameters() -> None:
    module = GAN()
    count = len(list(module.discriminator.parameters()))
    fit(module, gan_loader(2))
    # During the generator's step the discriminator's parameters did not require gradients
    # (so its backward left them without one), the generator's did.
    assert module.d_requires_grad_in_g_step == [[False] * count] * 2
    assert module.g_requires_grad_in_g_step == [[True] * 4] * 2
    assert module.d_grad_is_none_after_g_backward == [True, True]
    # untoggle_optimizer gave them back.
    assert all(p.requires_grad for p in module.discriminator.parameters())
    assert all(p.requires_grad for p in module.generator.parameters())


def test_untoggle_keeps_a_parameter_frozen_on_purpose_frozen() -> None:
    module = GAN()
    frozen = module.discriminator[0].bias
    frozen.requires_grad_(False)
    start = frozen.detach().clone()
    fit(module, gan_loader(2))
    assert frozen.requires_grad is False
    assert torch.equal(frozen, start)
    others = [p for p in module.discriminator.parameters() if p is not frozen]
    assert all(p.requires_grad for p in others)
    assert module.d_requires_grad_in_g_step == [[False] * 4] * 2


def test_manual_backward_under_automatic_optimization_is_a_clear_error() -> None:
    """Lightning refuses it too; without the check torch says 'backward through the graph a
    second time', which names neither the cause nor the fix."""

    class Automatic(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = F.mse_loss(self(x), y)
            self.manual_backward(loss)
            return loss

    trainer = Trainer(max_steps=1, **bare_trainer_kwargs())
    with pytest.raises(MisconfigurationError, match="automatic_optimization = False"):
        trainer.fit(Automatic(), loader())


def test_fp16_critic_stepped_twice_per_batch_equals_torch_amp_updating_after_each_step() -> None:
    """A WGAN-style critic stepped twice per batch under 16-mixed: as in Lightning, the scale is
    updated after each step that leaves no other gradient pending, so this works and equals
    plain torch.amp calling ``scaler.update()`` after each ``scaler.step``. The first batch
    overflows, so a skipped step and a halved scale are part of what is compared."""

    class Critic(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            _, self.discriminator = gan_nets()

        def training_step(self, batch: Any, batch_idx: int) -> None:
            real, _noise = batch
            optimizer = self.optimizers()
            for _ in range(2):
                self.manual_backward(bce(self.discriminator(real), True))
                optimizer.step()
                optimizer.zero_grad()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.discriminator.parameters(), lr=0.05, momentum=0.9)

    module = Critic()
    trainer = Trainer(
        max_epochs=1, precision="16-mixed", accelerator="cpu", **bare_trainer_kwargs()
    )
    trainer.fit(module, gan_loader(3, big=(0,)))

    _, reference = gan_nets()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    scales = []
    for real, _noise in gan_loader(3, big=(0,)):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = bce(reference(real), True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            scales.append(scaler.get_scale())
    assert scales[0] == INIT_SCALE / 2  # the reference really skipped a step
    assert trainer.global_step == 3
    for mine, theirs in zip(module.discriminator.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert trainer.accelerator.precision.scaler.get_scale() == scales[-1]  # type: ignore[attr-defined]
