"""Steps within one run only increase: a fresh ``fit`` into a run that has steps goes on after them.

A Trainer's ``fit`` starts again at step 0 unless it resumes a checkpoint. When a logger's
run already holds steps (an earlier ``fit`` of the same Trainer, or of another Trainer given
the same logger), the steps the new fit sends are offset by the last step the run holds, so
that its curves continue after the earlier ones instead of writing over them (W&B would drop
them). The offset holds for the later ``validate`` / ``test`` calls as well, until the next
fresh ``fit``. A checkpoint records it, so ``fit(ckpt_path=...)`` continues with the same one.

``Logger.__init_subclass__`` routes every logger's ``log_metrics``, ``checkpoint_state`` and
``continue_run`` through here, so loggers of your own get the same steps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.loggers.base import Logger

# The key under which a checkpoint keeps the offset, beside the logger's own state.
OFFSET_KEY = "ember_step_offset"


@dataclass
class _Steps:
    offset: int = 0
    last: int | None = None


# By id (a logger need not be hashable), with a weak reference to tell a reused id apart.
_steps: dict[int, tuple[weakref.ref[Logger], _Steps]] = {}


def _of(logger: Logger) -> _Steps:
    entry = _steps.get(id(logger))
    if entry is not None and entry[0]() is logger:
        return entry[1]
    key = id(logger)
    steps = _Steps()
    _steps[key] = (weakref.ref(logger, lambda _: _steps.pop(key, None)), steps)
    return steps


def run_step(logger: Logger, step: int) -> int:
    """The step of ``logger``'s run for the Trainer's ``step`` (remembered as the last one)."""
    steps = _of(logger)
    step = int(step) + steps.offset
    steps.last = step if steps.last is None else max(steps.last, step)
    return step


def start_fit(logger: Logger) -> None:
    """A ``fit`` starts: its steps go on after the last one the run holds."""
    steps = _of(logger)
    steps.offset = steps.last or 0


def with_offset(logger: Logger, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (the logger's ``checkpoint_state``) with the run's offset, when it has one."""
    offset = _of(logger).offset
    return {**state, OFFSET_KEY: offset} if offset else state


def resume(logger: Logger, state: dict[str, Any], step: int) -> tuple[dict[str, Any], int]:
    """Take the offset back from a checkpoint's ``state``; return the logger's own state and
    the run's step for the Trainer's ``step``."""
    own = {key: value for key, value in state.items() if key != OFFSET_KEY}
    steps = _of(logger)
    steps.offset = int(state.get(OFFSET_KEY, 0))
    steps.last = step + steps.offset
    return own, steps.last
