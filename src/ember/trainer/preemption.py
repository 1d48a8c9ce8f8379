"""Preemption: SIGTERM or SIGINT during fit saves ``last`` and exits non-zero.

The signal only sets a flag (``RunContext.preempted``); the training loop votes it at the
next step boundary, so every process stops at the same step without a blocking collective
per step, saves one ``last`` checkpoint together and leaves. A second signal aborts at once
(``KeyboardInterrupt``), as Ctrl-C twice does elsewhere. With no checkpoint callback nothing
is saved. If a peer is already gone the save cannot complete: its temporary directory is never
renamed, and the newest complete checkpoint stays the one to resume from.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ember.trainer.context import RunContext
    from ember.trainer.trainer import Trainer

SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The stop vote: 0 go on, 1 stop (``should_stop``), 2 preempted (save last and exit).
STOP, PREEMPT = 1, 2


class Preempted(BaseException):
    """Every process agreed to stop at this step boundary because one got SIGTERM / SIGINT
    (``signal``); the Trainer saves ``last`` and exits. A BaseException, like
    KeyboardInterrupt: ``except Exception`` in user code must not swallow it."""

    def __init__(self, signal: int) -> None:
        super().__init__(signal)
        self.signal = signal


def vote(context: RunContext) -> int:
    """This process's vote at a step boundary. ``max_time`` votes here too: one clock read,
    and the stop is agreed like any other (the first process past the deadline decides)."""
    if time.monotonic() >= context.deadline:
        context.should_stop = True
    return PREEMPT if context.preempted else int(context.should_stop)


def act_on(context: RunContext, decision: int) -> None:
    """Act on what the processes agreed: raise ``Preempted`` (every process together), or
    note a stop."""
    if decision >= PREEMPT:
        raise Preempted(context.preempted or signal.SIGTERM)
    if decision:
        context.should_stop = True


@contextmanager
def signals_stop(context: RunContext) -> Iterator[None]:
    """While fit runs, SIGTERM / SIGINT set ``context.preempted`` instead of killing the
    process (main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if context.preempted:  # the second signal: stop now, save nothing
            raise KeyboardInterrupt
        context.preempted = signum
        print(
            f"ember: got {signal.Signals(signum).name}; stopping at the next step boundary "
            "(send it again to stop at once).",
            file=sys.stderr,
            flush=True,
        )

    previous: dict[signal.Signals, Any] = {}
    for signum in SIGNALS:
        previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if context.preempted:  # it came after the last step boundary: fit had finished
        raise SystemExit(
            f"ember: got {signal.Signals(context.preempted).name} after training's last step; "
            "fit had finished (its checkpoints are complete), nothing more was saved."
        )


def save_and_exit(trainer: Trainer, context: RunContext, signum: int) -> NoReturn:
    """Every process agreed to stop for ``signum``: save ``last`` (when a checkpoint callback
    exists) and raise ``SystemExit`` with a message that says how to resume."""
    state = context.state
    name = signal.Signals(signum).name
    callback = trainer.checkpoint_callback
    save_last = getattr(callback, "save_last_checkpoint", None)
    where = f"global step {state.global_step} (epoch {state.epoch}, batch {state.batch_idx})"
    if save_last is None:
        message = (
            f"ember: stopped by {name} at {where}. Checkpointing is off, so nothing was "
            "saved; a new fit starts from the beginning."
        )
    else:
        path = save_last(trainer, context.module)
        # Every process leaves together, after rank 0 finished writing: a launcher that
        # ends the group when one process exits must not stop rank 0 mid-save.
        trainer.accelerator.wait_for_everyone()
        message = (
            f"ember: stopped by {name} at {where}; saved {str(path)!r}. Continue with "
            "Trainer(...).fit(..., ckpt_path='last')."
        )
    raise SystemExit(message)
