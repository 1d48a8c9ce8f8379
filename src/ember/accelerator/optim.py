"""Gradient accumulation state, and the optimizer / scheduler wrappers that respect it.

``GradientState`` answers, for the batch being processed: is this the last batch of its
accumulation window (``sync_gradients``), how many batches does the window hold (the loss is
divided by that), and, when steps report ``num_items``, how many items the window holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ember.accelerator.precision import Precision
from ember.errors import MisconfigurationError


@dataclass(slots=True)
class _LoaderFrame:
    """One pass over one loader: its length (None when unknown) and what was consumed."""

    num_batches: int | None = None
    batches_seen: int = 0
    end_of_dataloader: bool = False


class GradientState:
    """Where the current accumulation window stands. Shared by the accelerator, its
    optimizers, schedulers and loaders; one instance per ``Accelerator``."""

    # Slots: these attributes are read and written every batch.
    __slots__ = (
        "_default_frame",
        "_frames",
        "accumulation_steps",
        "item_total",
        "items_used",
        "sync_gradients",
        "window_batches",
        "window_size",
    )

    def __init__(self, accumulation_steps: int = 1) -> None:
        self.accumulation_steps = accumulation_steps
        self.sync_gradients = True
        #: Batches in the current window: ``backward`` divides the loss by it.
        self.window_size = 1
        #: Batches of the current window processed so far (the current one included). Without
        #: accumulation every batch is a whole window, and this stays 1.
        self.window_batches = 1 if accumulation_steps == 1 else 0
        #: Sum of ``num_items`` over the window, when the steps report it.
        self.item_total: Tensor | int | None = None
        #: Whether an optimizer stepped on ``item_total``: the next ``add_items`` starts a new
        #: count (loops without ``accumulate`` never reach the reset in ``next_batch``).
        self.items_used = False
        self._default_frame = _LoaderFrame()
        self._frames: list[_LoaderFrame] = []

    # --- loaders open and close frames -------------------------------------------------------
    @property
    def _frame(self) -> _LoaderFrame:
        return self._frames[-1] if self._frames else self._default_frame

    def begin_epoch(self, num_batches: int | None) -> _LoaderFrame:
        """A loader starts a pass of ``num_batches`` batches (None when unknown); the loader
        keeps the returned frame to mark its last batch."""
        frame = _LoaderFrame(num_batches)
        self._frames.append(frame)
        return frame

    def end_epoch(self) -> None:
        """The loader that began last finished its pass."""
        if self._frames:
            self._frames.pop()

    @property
    def end_of_dataloader(self) -> bool:
        """Whether the batch just yielded is the last of its loader's pass."""
        return self._frame.end_of_dataloader

    @end_of_dataloader.setter
    def end_of_dataloader(self, value: bool) -> None:
        self._frame.end_of_dataloader = value

    @property
    def batches_seen(self) -> int:
        """Batches of the current pass that went through ``next_batch`` (counted when
        accumulating: with one batch per window there are no windows to place)."""
        return self._frame.batches_seen

    def skip_batches(self, count: int) -> None:
        """Count ``count`` batches as seen without processing them (resuming mid-epoch)."""
        self._frame.batches_seen += count

    # --- one call per batch --------------------------------------------------------------------
    def next_batch(self) -> bool:
        """Advance to the next batch; return whether it closes its accumulation window."""
        steps = self.accumulation_steps
        if steps == 1:
            # Every batch is a whole window: window_size, window_batches and sync_gradients
            # stay 1, 1 and True; only the item count restarts. The common case, kept cheap.
            self.item_total = None
            return True
        frame = self._frames[-1] if self._frames else self._default_frame
        position = frame.batches_seen % steps
        if position == 0:
            remaining = (
                None if frame.num_batches is None else frame.num_batches - frame.batches_seen
            )
            # A last window with fewer than `steps` batches is divided by its own size.
            self.window_size = steps if remaining is None else max(1, min(steps, remaining))
            self.item_total = None
        frame.batches_seen += 1
        self.window_batches = position + 1
        self.sync_gradients = self.window_batches >= self.window_size or frame.end_of_dataloader
        return self.sync_gradients

    def add_items(self, num_items: Tensor | int) -> None:
        """Count the items whose summed loss the current batch backpropagated."""
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1:
                raise MisconfigurationError(
                    f"`num_items` must be one number, got a tensor of shape "
                    f"{tuple(num_items.shape)}."
                )
            num_items = num_items.detach()
        elif isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
            raise MisconfigurationError(
                f"`num_items={num_items!r}` is not supported: give the number of items the "
                "summed loss covers, as an int >= 0 or a one-element tensor."
            )
        if self.item_total is None or self.items_used:
            self.item_total = num_items
            self.items_used = False
        else:
            self.item_total = self.item_total + num_items

    def needs_normalising(self) -> bool:
        """Whether the window's gradient must still be scaled at the step: by the item count
        (``num_items``), or because the window ended short of its announced size."""
        return self.item_total is not None or self.window_batches < self.window_size

    def window_correction(self) -> float:
        """Factor that fixes a window cut short by a loader of unknown length (else 1)."""
        # window_batches is 0 when `accumulate` was never entered (a plain loop): no window.
        if 0 < self.window_batches < self.window_size:
            return self.window_size / self.window_batches
        return 1.0


class AcceleratedOptimizer(Optimizer):
    """An optimizer whose ``step`` and ``zero_grad`` wait for the end of the window.

    ``step`` unscales the gradient (fp16), applies the ``num_items`` normalisation, steps
    through the precision plugin (which may skip on inf/NaN) and records whether it stepped.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        gradient_state: GradientState,
        precision: Precision,
        prepare_gradients: Callable[[AcceleratedOptimizer], None],
    ) -> None:
        # Deliberately no super().__init__: this object only forwards to `optimizer`. It is an
        # Optimizer subclass so LR schedulers accept it.
        self.optimizer = optimizer
        self.gradient_state = gradient_state
        self.precision = precision
        self._prepare_gradients = prepare_gradients
        #: Whether the gradients of this window were already unscaled and normalised.
        self.gradients_prepared = False
        #: Whether the last ``step`` was skipped (fp16 inf/NaN gradients).
        self.step_was_skipped = False

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, except in the middle of an accumulation window."""
        if self.gradient_state.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        """Step at the end of an accumulation window; do nothing before it."""
        state = self.gradient_state
        if not state.sync_gradients:
            return None
        if self.precision.scales_gradients:
            if not self.gradients_prepared:
                self._prepare_gradients(self)
            self.step_was_skipped = not self.precision.optimizer_step(self.optimizer)
        else:
            # Nothing to unscale and nothing can be skipped: the plain step, unless the window
            # needs its gradient normalised (num_items, or a window cut short).
            if not self.gradients_prepared and state.needs_normalising():
                self._prepare_gradients(self)
            self.optimizer.step()
        state.items_used = True
        self.gradients_prepared = False
        return None

    def __repr__(self) -> str:
        return f"AcceleratedOptimizer({self.optimizer!r})"


class AcceleratedScheduler:
    """A scheduler that steps only when its optimizer really stepped.

    With ``step_with_optimizer=False`` it steps whenever ``step`` is called (per epoch, say).
    """

    def __init__(
        self,
        scheduler: Any,
        optimizers: list[AcceleratedOptimizer],
        gradient_state: GradientState,
        step_with_optimizer: bool = True,
    ) -> None:
        self.scheduler = scheduler
        self.optimizers = optimizers
        self.gradient_state = gradient_state
        self.step_with_optimizer = step_with_optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the scheduler, unless the window is open or the optimizer skipped its step."""
        if self.step_with_optimizer:
            if not self.gradient_state.sync_gradients:
                return
            if any(optimizer.step_was_skipped for optimizer in self.optimizers):
                return
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return list(self.scheduler.get_last_lr())

    @property
    def optimizer(self) -> Any:
        return self.scheduler.optimizer

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scheduler.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"AcceleratedScheduler({self.scheduler!r})"


def scale_gradients(optimizer: Optimizer, factor: Tensor | float) -> None:
    """Multiply every gradient of ``optimizer`` by ``factor`` in place."""
    grads = [
        parameter.grad
        for group in optimizer.param_groups
        for parameter in group["params"]
        if parameter.grad is not None
    ]
    if not grads:
        return
    if isinstance(factor, Tensor):
        factor = factor.to(grads[0].device)
    torch._foreach_mul_(grads, factor)
