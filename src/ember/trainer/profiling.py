"""Where each training step's time goes: ``Trainer(profiler=None | "simple" | "pytorch")``.

The loop does not time itself in sections. It calls ``profiler.switch(part)`` at the few
boundaries it already has (a batch arrived, ``training_step`` starts, it returned, waiting for
the next batch begins); ``backward``, the optimizer step, the hooks, the loggers and the
collectives of the loop switch to their part and back. The profiler charges the time since the
last switch to the part that was running, so every moment of the training window is charged to
exactly one part: the parts add up to the measured time by construction.

Disabled (``Profiler``, the default), ``switch`` returns its argument and does nothing else,
``timed`` returns the function it is given (the hooks and the stop vote are then the very
objects they would be without a profiler): the same loop code runs either way, at the cost of a
few empty calls per step.

``docs/profiling.md`` explains the table part by part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ember.accelerator.distributed import Agreement
from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.trainer.context import RunContext

# The parts, as list indices (the loop passes them on every step). The step parts first.
DATA, FORWARD, BACKWARD, OPTIMIZER, CALLBACKS, LOOP, COLLECTIVES = range(7)
#: Validation inside fit (sanity check included): reported on its own line, not a step share.
VALIDATION = 7
#: Fit outside the training window (set-up, on_fit_start, on_train_end ...): not reported.
OUTSIDE = 8
#: Parts in which every switch is ignored (charged to that part whole, hooks included).
_HELD = VALIDATION

#: ``profiler/<name>_share`` of each step part.
PART_NAMES = ("data", "forward", "backward", "optimizer", "callbacks", "loop", "collectives")
PART_LABELS = (
    "waiting for data",
    "forward (training_step)",
    "backward",
    "optimizer step",
    "callbacks and logging",
    "ember's loop",
    "waiting at collectives",
)
_RANGE_NAMES = tuple(f"ember/{name}" for name in PART_NAMES) + ("ember/validation",)


class Profiler:
    """No profiling: every method does nothing (the form the loop always calls).

    Subclasses time the parts (``SimpleProfiler``) or record a ``torch.profiler`` trace
    (``PyTorchProfiler``).
    """

    def switch(self, part: int) -> int:
        """From now on charge time to ``part``; return the part that was running (pass it
        back to ``switch`` to resume it)."""
        return part

    def enter(self, part: int) -> int:
        """Like ``switch``, also from a held part (validation; fit outside training)."""
        return part

    def timed(self, part: int, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, with its time charged to ``part`` (here: ``function`` itself)."""
        return function

    @property
    def timed_hooks(self) -> Callable[[Callable[..., Any]], Callable[..., Any]] | None:
        """What wraps each hook so its time goes to "callbacks" (None: hooks as they are)."""
        return None

    def timed_agreement(self, agreement: Agreement) -> Agreement:
        """The stop vote, with its waits charged to the collectives (here: as it is)."""
        return agreement

    def start(self, context: RunContext) -> None:
        """A fit begins (before its sanity check); nothing is charged to a step part yet."""

    def stop(self) -> None:
        """Stop measuring without a report (fit failed or was interrupted)."""

    def finish(self, context: RunContext) -> None:
        """The training window ended: report (rank zero prints; every rank's loggers get
        what they write)."""


class _SwitchingProfiler(Profiler):
    """What both profilers share: hooks, stop vote and reductions switch to their part."""

    def timed(self, part: int, function: Callable[..., Any]) -> Callable[..., Any]:
        return partial(_timed_call, self.switch, part, function)

    @property
    def timed_hooks(self) -> Callable[[Callable[..., Any]], Callable[..., Any]] | None:
        return partial(self.timed, CALLBACKS)

    def timed_agreement(self, agreement: Agreement) -> Agreement:
        if not agreement.shared:  # one process: the vote waits for nothing
            return agreement
        return _TimedAgreement(agreement.device, self.switch)


class SimpleProfiler(_SwitchingProfiler):
    """Times each part of the training steps with ``time.perf_counter``.

    Args:
        synchronize: on CUDA, wait for the device at every switch, so a kernel's time is
            charged to the part that launched it (without it, queued kernels are charged to
            whatever next waits for the device, usually the optimizer step's loss check).
            Costs a few microseconds per switch, about eight switches per step.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> from ember.profilers import SimpleProfiler
        >>> class Regression(ember.TrainModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.layer = nn.Linear(3, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.mse_loss(self.layer(x), y)
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> x = torch.randn(64, 3)
        >>> loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16)
        >>> profiler = SimpleProfiler()
        >>> trainer = ember.Trainer(max_epochs=2, profiler=profiler, logger=False,
        ...                         enable_progress_bar=False, enable_checkpointing=False,
        ...                         enable_model_summary=False)
        >>> trainer.fit(Regression(), loader)  # doctest: +ELLIPSIS
        Profiler (simple): 8 training batches in ... s
        part                          mean/batch       total    share
        waiting for data              ...
        >>> list(profiler.shares())  # each logged as profiler/<part>_share
        ['data', 'forward', 'backward', 'optimizer', 'callbacks', 'loop', 'collectives']
        >>> round(sum(profiler.shares().values()), 6)
        1.0
    """

    def __init__(self, synchronize: bool = True) -> None:
        self.synchronize = synchronize
        self.totals = [0.0] * (OUTSIDE + 1)
        self.batches = 0
        self.validations = 0
        self._current = OUTSIDE
        self._last = time.perf_counter()
        self._first_batch = 0
        self._clock: Callable[[], float] = time.perf_counter
        self._running = False  # between a fit's start and stop: outside, nothing is counted

    def switch(self, part: int) -> int:
        now = self._clock()
        current = self._current
        self.totals[current] += now - self._last
        self._last = now
        if current >= _HELD:
            return part
        self._current = part
        return current

    def enter(self, part: int) -> int:
        if not self._running:  # a standalone validate()/test(): not part of the fit's table
            return part
        now = self._clock()
        current = self._current
        self.totals[current] += now - self._last
        self._last = now
        self._current = part
        if part == VALIDATION:
            self.validations += 1
        return current

    def start(self, context: RunContext) -> None:
        self.totals = [0.0] * (OUTSIDE + 1)
        self.validations = 0
        self._first_batch = context.state.total_batch_idx
        device = context.accelerator.device
        if self.synchronize and device.type == "cuda":
            self._clock = partial(_synchronized_clock, partial(torch.cuda.synchronize, device))
        else:
            self._clock = time.perf_counter
        self._current = OUTSIDE
        self._last = self._clock()
        self._running = True

    def stop(self) -> None:
        self.enter(OUTSIDE)
        self._running = False

    def finish(self, context: RunContext) -> None:
        self.stop()
        self.batches = context.state.total_batch_idx - self._first_batch
        if self.batches == 0:
            return
        shares = self.shares()
        context.send_to_loggers({f"profiler/{name}_share": shares[name] for name in PART_NAMES})
        if context.is_global_zero:
            print(self.table(context.accelerator.num_processes))

    @property
    def step_total(self) -> float:
        """Seconds of the training window (every step part; validation excluded)."""
        return sum(self.totals[:VALIDATION])

    def shares(self) -> dict[str, float]:
        """Each step part's share of the training window (they add up to 1)."""
        total = self.step_total or 1.0
        return {name: self.totals[index] / total for index, name in enumerate(PART_NAMES)}

    def table(self, processes: int = 1) -> str:
        """The report: each part's mean per batch, total and share of the step."""
        batches = max(self.batches, 1)
        total = self.step_total
        where = f", rank 0 of {processes}" if processes > 1 else ""
        width = len("validation (not in the step)")
        lines = [
            f"Profiler (simple): {self.batches} training batches in {total:.3f} s{where}",
            f"{'part':<{width}}  {'mean/batch':>12}  {'total':>10}  {'share':>7}",
        ]
        for index, label in enumerate(PART_LABELS):
            seconds = self.totals[index]
            lines.append(
                f"{label:<{width}}  {seconds / batches * 1e3:>9.3f} ms  {seconds:>8.3f} s  "
                f"{seconds / (total or 1.0):>7.1%}"
            )
        lines.append(
            f"{'step (sum of the above)':<{width}}  {total / batches * 1e3:>9.3f} ms  "
            f"{total:>8.3f} s  {1.0 if total else 0.0:>7.1%}"
        )
        lines.append(
            f"{'validation (not in the step)':<{width}}  {self.validations:>7} runs  "
            f"{self.totals[VALIDATION]:>8.3f} s"
        )
        return "\n".join(lines)


class PyTorchProfiler(_SwitchingProfiler):
    """Records a ``torch.profiler`` trace of a few training steps: a Chrome trace JSON
    (``*.pt.trace.json``, one per process) that TensorBoard's profiler plugin and Perfetto open.

    A profiler step ends each time the loop starts waiting for the next batch. The schedule
    skips ``wait`` steps, warms up for ``warmup`` and records ``active`` (once), so a long run
    records only those; then the profiler stops. Each part of the step is a range named
    ``ember/<part>`` (``ember/data``, ``ember/forward`` ... as in the "simple" table, and
    ``ember/validation``) in the trace.

    Args:
        dirpath: where the traces go (default: ``<trainer.log_dir>/profiler``).
        wait: steps skipped first.
        warmup: steps profiled but not recorded next (the profiler's own start-up).
        active: steps recorded then.
        record_shapes: passed to ``torch.profiler.profile``.
        profile_memory: passed to ``torch.profiler.profile``.
        with_stack: passed to ``torch.profiler.profile``.

    Examples:
        ```python
        import ember
        from ember.profilers import PyTorchProfiler

        profiler = PyTorchProfiler(dirpath="traces", wait=5, warmup=1, active=3)
        trainer = ember.Trainer(max_epochs=1, profiler=profiler)
        trainer.fit(module, train_loader)
        print(profiler.trace_dir)  # traces/: one *.pt.trace.json per process
        ```

        Open the trace in TensorBoard (``tensorboard --logdir traces``) or Perfetto.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        for name, value in (("wait", wait), ("warmup", warmup), ("active", active)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MisconfigurationError(
                    f"PyTorchProfiler(`{name}={value!r}`) is not supported: use an integer >= 0."
                )
        if active < 1:
            raise MisconfigurationError(
                f"PyTorchProfiler(`active={active!r}`) records nothing: use an integer >= 1."
            )
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.schedule = (wait, warmup, active)
        self.options: dict[str, Any] = {
            "record_shapes": record_shapes,
            "profile_memory": profile_memory,
            "with_stack": with_stack,
        }
        #: Where the traces went (set by the fit that wrote them).
        self.trace_dir: Path | None = None
        self._profile: Any = None
        self._range: Any = None
        self._current = OUTSIDE
        self._steps_left = 0

    def switch(self, part: int) -> int:
        current = self._current
        if current >= _HELD or self._profile is None:
            return part
        self._close_range()
        if part == DATA:
            self._profile.step()
            self._steps_left -= 1
            if self._steps_left == 0:  # the schedule is done (its trace written): stop
                self.stop()
                return current
        self._current = part
        self._open_range(part)
        return current

    def enter(self, part: int) -> int:
        current = self._current
        if self._profile is None:
            return current
        self._close_range()
        self._current = part
        if part < OUTSIDE:
            self._open_range(part)
        return current

    def _open_range(self, part: int) -> None:
        self._range = torch.profiler.record_function(_RANGE_NAMES[part])
        self._range.__enter__()

    def _close_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def start(self, context: RunContext) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.stop()  # one left running by an interrupted fit
        directory = self.dirpath
        if directory is None:
            # Rank 0 alone reads its loggers (reading a logger's folder may create it, or
            # start a W&B run); every rank starts here, so the broadcast is met by all.
            chosen = str(_default_trace_dir(context)) if context.is_global_zero else None
            directory = Path(context.accelerator.broadcast(chosen))
        self.trace_dir = directory
        activities = [ProfilerActivity.CPU]
        if context.accelerator.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        wait, warmup, active = self.schedule
        rank = context.accelerator.process_index
        self._profile = profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(directory), worker_name=f"rank{rank}"),
            **self.options,
        )
        self._profile.__enter__()
        self._current = OUTSIDE
        self._steps_left = wait + warmup + active

    def stop(self) -> None:
        self._close_range()
        self._current = OUTSIDE
        if self._profile is not None:
            profile, self._profile = self._profile, None
            profile.__exit__(None, None, None)

    def finish(self, context: RunContext) -> None:
        self.stop()
        if context.is_global_zero:
            print(
                f"Profiler (pytorch): traces in {self.trace_dir} (open in TensorBoard or Perfetto)"
            )


def resolve(profiler: Any) -> Profiler:
    """``Trainer(profiler=...)`` as a ``Profiler``: None, "simple", "pytorch" or an instance."""
    if isinstance(profiler, Profiler):
        return profiler
    if profiler is None:
        return Profiler()
    if profiler == "simple":
        return SimpleProfiler()
    if profiler == "pytorch":
        return PyTorchProfiler()
    raise MisconfigurationError(
        f"`profiler={profiler!r}` is not supported. Accepted values: None, 'simple', "
        "'pytorch', or an ember.profilers.SimpleProfiler / PyTorchProfiler."
    )


def _default_trace_dir(context: RunContext) -> Path:
    """``<trainer.log_dir>/profiler``: the first logger's folder, else the root directory
    (the accelerator's ``project_dir``, which is ``default_root_dir``). Rank 0 only."""
    for logger in context.loggers:
        if logger.log_dir is not None:
            return Path(logger.log_dir) / "profiler"
    return context.accelerator.project_dir / "profiler"


def _timed_call(
    switch: Callable[[int], int], part: int, function: Callable[..., Any], *args: Any
) -> Any:
    previous = switch(part)
    try:
        return function(*args)
    finally:
        switch(previous)


def _synchronized_clock(synchronize: Callable[[], None]) -> float:
    synchronize()
    return time.perf_counter()


class _TimedAgreement(Agreement):
    """The stop vote, its waits (the previous round's all-reduce) charged to collectives."""

    def __init__(self, device: torch.device, switch: Callable[[int], int]) -> None:
        super().__init__(device)
        self._switch = switch

    def exchange(self, local: int) -> int:
        previous = self._switch(COLLECTIVES)
        try:
            return super().exchange(local)
        finally:
            self._switch(previous)

    def now(self, local: int) -> int:
        previous = self._switch(COLLECTIVES)
        try:
            return super().now(local)
        finally:
            self._switch(previous)

    def settle(self) -> int:
        previous = self._switch(COLLECTIVES)
        try:
            return super().settle()
        finally:
            self._switch(previous)
