"""Run-control arguments of the Trainer: ``min_epochs`` / ``min_steps``, ``max_time``,
``fast_dev_run``, ``overfit_batches``, and what they decide in the loop."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.trainer.context import RunContext

_MAX_TIME_ACCEPTED = (
    'a "DD:HH:MM:SS" string (e.g. "00:12:00:00"), a datetime.timedelta, a dict of timedelta '
    'arguments (e.g. {"hours": 12}), or None for no limit'
)
_TIMEDELTA_KEYS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")


def check_minimum(name: str, value: Any) -> int | None:
    """None (no minimum) or an integer >= 0."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: use an integer >= 0, or None for no minimum."
        )
    return value


def parse_max_time(value: Any) -> timedelta | None:
    """``max_time`` as a ``timedelta`` (None: no limit)."""
    if value is None:
        return None
    duration: timedelta | None = None
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})\s*", value)
        if match:
            days, hours, minutes, seconds = (int(part) for part in match.groups())
            duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(value, dict) and value and set(value) <= set(_TIMEDELTA_KEYS):
        numbers = all(
            isinstance(item, (int, float)) and not isinstance(item, bool) for item in value.values()
        )
        duration = timedelta(**value) if numbers else None
    if duration is None or duration <= timedelta(0):
        raise MisconfigurationError(
            f"`max_time={value!r}` is not supported: use {_MAX_TIME_ACCEPTED}; it must be "
            "longer than zero."
        )
    return duration


def may_stop_early(context: RunContext) -> bool:
    """Whether a stop asked through ``should_stop`` (EarlyStopping, ``max_time``) may end fit
    now: ``min_epochs`` and ``min_steps`` are reached. Read from the loop progress, which is
    the same on every process, so every process decides alike."""
    settings = context.settings
    state = context.state
    return (settings.min_steps is None or state.global_step >= settings.min_steps) and (
        settings.min_epochs is None or state.epoch >= settings.min_epochs
    )


def estimated_stepping_batches(
    batches_per_epoch: int | None, accumulate_grad_batches: int, max_epochs: int, max_steps: int
) -> int | float:
    """Optimizer steps of a whole fit (``Trainer.estimated_stepping_batches``)."""
    if batches_per_epoch is None or max_epochs == -1:
        return max_steps if max_steps != -1 else math.inf
    total = math.ceil(batches_per_epoch / accumulate_grad_batches) * max_epochs
    return min(total, max_steps) if max_steps != -1 else total
