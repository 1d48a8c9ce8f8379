"""Gradient accumulation state, and the optimizer / scheduler wrappers that respect it.

``GradientState`` answers, for the batch being processed: is this the last batch of its
accumulation window (``sync_gradients``), how many batches does the window hold (the loss is
divided by that), and, when steps report ``num_items``, how many items the window holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.accelerator.step import OptimizerStep


@dataclass(slots=True, eq=False)
class _LoaderFrame:
    """One pass over one loader: its length (None when unknown) and what was consumed."""

    num_batches: int | None = None
    batches_seen: int = 0
    end_of_dataloader: bool = False
    ended: bool = False
    #: Batches yielded so far, and how many of them ``next_batch`` counted in this frame.
    yielded: int = 0
    counted: int = 0
    #: When the pass yielded its first batch, in the order of first batches of all passes.
    first_yield: int = -1
    #: The prepared loader this pass goes over (None for the frame of loops without one).
    source: object = None
    #: A sharded pass: the padded duplicates in the round of its latest batch, and when that
    #: batch came (numbered among the latest batches of all sharded passes).
    round_padding: int = 0
    padding_mark: int = -1

    def mark_first_yield(self, state: GradientState) -> None:
        """The pass handed out its first batch: number it among the passes' first batches."""
        self.first_yield = state.first_yields
        state.first_yields += 1

    def mark_padding(self, state: GradientState, round_padding: int) -> None:
        """The sharded pass handed out a batch of a round holding ``round_padding``
        duplicates: it becomes the newest among ``state.sharded_passes``."""
        state.padding_marks += 1
        self.padding_mark = state.padding_marks
        self.round_padding = round_padding


class GradientState:
    """Where the current accumulation window and loop iteration stand. Shared by the
    accelerator, its optimizers, schedulers and loaders; one instance per ``Accelerator``.

    Windows: ``accumulate()`` calls ``next_batch`` once per batch. The batches are counted in
    the frame of the loader pass that owns the windows, kept until that pass ends or a new
    pass of the same loader begins (the next epoch; an abandoned iterator). Then the windows
    follow their loader: its newest pass owns them. The first owner is chosen among the open
    passes that handed out exactly one batch not yet counted (the loop's own loader moves in
    step with ``accumulate``): the one whose first batch came first. Another iterator opened
    or drawn from meanwhile (a validation iterator kept open, say) does not move the count.

    Iterations: the gradient scaler's update and the "already unscaled" marks of the
    optimizers belong to one gradient. A new gradient begins at the first ``backward`` of a
    new loop iteration (see ``ember.accelerator.step``); ``signal_pending`` says a loader drew
    a batch or ``accumulate`` was entered since the last ``backward``.
    """

    # Slots: these attributes are read and written every batch.
    __slots__ = (
        "_default_frame",
        "_frames",
        "_owner",
        "_owner_source",
        "accumulation_steps",
        "consumed",
        "first_yields",
        "generation",
        "generation_signalled",
        "item_total",
        "padding_marks",
        "sharded_passes",
        "signal_pending",
        "sync_gradients",
        "window_batches",
        "window_size",
    )

    def __init__(self, accumulation_steps: int = 1) -> None:
        self.accumulation_steps = accumulation_steps
        #: The frames of the sharded passes not yet ended, whose padding ``gather_for_metrics``
        #: drops (``ember.accelerator.data.duplicates_in_last_batch``), and the count that
        #: orders their latest batches. ``reset`` keeps them: each pass's iterator ends it.
        self.sharded_passes: list[_LoaderFrame] = []
        self.padding_marks = 0
        self.reset()

    def reset(self) -> None:
        """Forget every window, pass and gradient (a new run starts; loaders stay attached)."""
        self.sync_gradients = True
        #: Batches in the current window: ``backward`` divides the loss by it.
        self.window_size = 1
        #: Batches of the current window processed so far (the current one included). Without
        #: accumulation every batch is a whole window, and this stays 1.
        self.window_batches = 1 if self.accumulation_steps == 1 else 0
        #: Sum of ``num_items`` over the gradient, when the steps report it.
        self.item_total: Tensor | int | None = None
        #: Counts gradients: an optimizer unscaled and normalised in this generation is not
        #: touched again until the next one begins.
        self.generation = 0
        #: Whether an optimizer unscaled, normalised or stepped the current gradient.
        self.consumed = False
        #: A loader drew a batch or ``accumulate`` was entered since the last ``backward``.
        self.signal_pending = False
        #: Whether the current gradient began after such a signal: then the loop marks its
        #: iterations, and a ``backward`` without a signal belongs to the same iteration.
        self.generation_signalled = False
        self._default_frame = _LoaderFrame()
        self._frames: list[_LoaderFrame] = []
        self._owner: _LoaderFrame | None = None
        #: The loader whose passes own the windows (kept when its pass ends).
        self._owner_source: object = None
        #: How many passes have yielded their first batch (orders them).
        self.first_yields = 0

    # --- loaders open and close frames -------------------------------------------------------
    def begin_pass(self, num_batches: int | None, source: object = None) -> _LoaderFrame:
        """Loader ``source`` starts a pass of ``num_batches`` batches (None when unknown); the
        loader keeps the returned frame to mark its last batch and to end it."""
        frame = _LoaderFrame(num_batches, source=source)
        if source is not None and self._owner is not None and self._owner.source is source:
            self._owner = None  # the owner's loader began a new pass: it takes the windows
        self._frames.append(frame)
        return frame

    def end_pass(self, frame: _LoaderFrame) -> None:
        """The pass of ``frame`` finished (or was abandoned). Idempotent."""
        if frame.ended:
            return
        frame.ended = True
        # Not necessarily the newest: passes may end in any order.
        for index in range(len(self._frames) - 1, -1, -1):
            if self._frames[index] is frame:
                del self._frames[index]
                break

    def _window_frame(self) -> _LoaderFrame:
        """The frame that counts the windows' batches: the owner, chosen again when its pass
        ended or was superseded (see the class docstring)."""
        owner = self._owner
        if owner is None or owner.ended or owner is self._default_frame:
            owner = self._choose_owner()
            self._owner = owner
            if owner.source is not None:
                self._owner_source = owner.source
        return owner

    def _choose_owner(self) -> _LoaderFrame:
        frames = self._frames
        if not frames:
            return self._default_frame
        source = self._owner_source
        if source is not None:
            same_loader = [frame for frame in frames if frame.source is source]
            if same_loader:
                return same_loader[-1]
        in_step = [frame for frame in frames if frame.yielded == frame.counted + 1]
        if in_step:
            return min(in_step, key=lambda frame: frame.first_yield)
        return frames[-1]

    @property
    def end_of_dataloader(self) -> bool:
        """Whether the batch just yielded is the last of its loader's pass (the pass that owns
        the windows; in a loop that never entered ``accumulate``, the newest pass)."""
        owner = self._owner
        if owner is not None and not owner.ended and owner is not self._default_frame:
            return owner.end_of_dataloader
        frame = self._frames[-1] if self._frames else (owner or self._default_frame)
        return frame.end_of_dataloader

    @end_of_dataloader.setter
    def end_of_dataloader(self, value: bool) -> None:
        self._window_frame().end_of_dataloader = value

    @property
    def batches_seen(self) -> int:
        """Batches of the window's pass that went through ``next_batch`` (counted when
        accumulating: with one batch per window there are no windows to place)."""
        return self._window_frame().batches_seen

    def skip_batches(self, count: int) -> None:
        """Count ``count`` batches as seen without processing them (resuming mid-epoch)."""
        self._window_frame().batches_seen += count

    # --- one call per batch --------------------------------------------------------------------
    def next_batch(self) -> bool:
        """Advance to the next batch; return whether it closes its accumulation window."""
        self.signal_pending = True  # a new loop iteration begins
        steps = self.accumulation_steps
        frame = self._owner
        if frame is None or frame.ended or frame is self._default_frame:
            frame = self._window_frame()
        if steps == 1:
            # Every batch is a whole window: window_size, window_batches and sync_gradients
            # stay 1, 1 and True; only the item count restarts. The common case, kept cheap.
            frame.counted += 1
            self.item_total = None
            return True
        position = frame.batches_seen % steps
        # A window begins, or a fresh state enters one already open (resumed mid-window).
        if position == 0 or self.window_batches == 0:
            start = frame.batches_seen - position
            remaining = None if frame.num_batches is None else frame.num_batches - start
            # A last window with fewer than `steps` batches is divided by its own size.
            self.window_size = steps if remaining is None else max(1, min(steps, remaining))
            if position == 0:
                self.item_total = None
        frame.batches_seen += 1
        frame.counted += 1
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
        self.item_total = num_items if self.item_total is None else self.item_total + num_items

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
    """A real optimizer's stand-in whose ``step`` and ``zero_grad`` wait for the window's end.

    ``step(closure=None, **kwargs)`` hands the gradient to ``OptimizerStep`` (unscale once,
    normalise, step through the precision plugin, which may skip on inf/NaN) and returns what
    the real ``step`` returned. Everything else (``state``, ``param_groups``, ``state_dict``,
    ``add_param_group``, the ``register_*_hook`` methods) is the real optimizer's.
    """

    def __init__(self, optimizer: Optimizer, stepper: OptimizerStep) -> None:
        # Deliberately no super().__init__: this object only forwards to `optimizer`. It is an
        # Optimizer subclass so LR schedulers and isinstance checks accept it.
        self.optimizer = optimizer
        self.stepper = stepper
        self.gradient_state = stepper.gradient_state
        #: The gradient generation this optimizer's gradient was last unscaled/normalised in.
        self.prepared_generation = -1
        #: The generation in which it last stepped (or tried to: fp16 may skip).
        self.stepped_generation = -1
        #: Whether the last ``step`` was skipped (fp16 inf/NaN gradients).
        self.step_was_skipped = False
        #: Set by a hook on the real optimizer: whether its ``step`` really ran. Only a
        #: precision that scales gradients can skip a step, so only then is the hook needed.
        self.real_step_ran = True
        self._own_hook = (
            optimizer.register_step_post_hook(self._mark_real_step)
            if stepper.precision.scales_gradients
            else None
        )

    def _mark_real_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.real_step_ran = True

    def release(self) -> None:
        """Remove the hook this wrapper put on the real optimizer (the accelerator forgets it)."""
        if self._own_hook is not None:
            self._own_hook.remove()
            self._own_hook = None

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

    # The hooks are the real optimizer's: step hooks fire only when it really steps.
    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, except in the middle of an accumulation window."""
        if self.gradient_state.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        """Step at the end of an accumulation window (do nothing before it); return what the
        real optimizer's ``step`` returned."""
        if not self.gradient_state.sync_gradients:
            return None
        return self.stepper.step(self, closure, kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # A real optimizer's hooks are not pickled (torch drops them): the copy registers
        # its own on the copied optimizer (``__setstate__``).
        state = self.__dict__.copy()
        state["_own_hook"] = self._own_hook is not None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        hooked = state.pop("_own_hook")
        self.__dict__.update(state)
        self._own_hook = (
            self.optimizer.register_step_post_hook(self._mark_real_step) if hooked else None
        )

    def __repr__(self) -> str:
        return f"AcceleratedOptimizer({self.optimizer!r})"


class AcceleratedScheduler:
    """A scheduler that steps only when its optimizer really stepped (Accelerate's convention).

    With ``step_with_optimizer=False`` it steps whenever ``step`` is called (per epoch, say).
    Otherwise each real optimizer step advances it ``steps_per_call`` times: the number of
    processes when each process's loader holds its share of the batches (so a schedule sized
    for the loader's length in one process keeps its length), once with ``split_batches``.
    A schedule with a ``total_steps`` (OneCycleLR) is never stepped past it.
    """

    def __init__(
        self,
        scheduler: Any,
        optimizers: list[AcceleratedOptimizer],
        gradient_state: GradientState,
        step_with_optimizer: bool = True,
        steps_per_call: int = 1,
    ) -> None:
        self.scheduler = scheduler
        self.optimizers = optimizers
        self.gradient_state = gradient_state
        self.step_with_optimizer = step_with_optimizer
        self.steps_per_call = steps_per_call

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the scheduler, unless the window is open or the optimizer skipped its step."""
        scheduler = self.scheduler
        if not self.step_with_optimizer:
            scheduler.step(*args, **kwargs)
            return
        if not self.gradient_state.sync_gradients:
            return
        if any(optimizer.step_was_skipped for optimizer in self.optimizers):
            return
        total = getattr(scheduler, "total_steps", None)
        for _ in range(self.steps_per_call):
            if total is not None and scheduler.last_epoch + 1 >= total:
                break  # OneCycleLR raises past its last step (a last, short epoch)
            scheduler.step(*args, **kwargs)

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
