"""Run-control arguments of the Trainer: ``min_epochs`` / ``min_steps``, ``max_time``,
``fast_dev_run``, ``overfit_batches``, and what they decide in the loop."""

from __future__ import annotations

import math
import re
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, RandomSampler

from ember.accelerator.sharding import loading_options
from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.hooks import Callback
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


def check_fast_dev_run(value: Any) -> int:
    """``fast_dev_run`` as a number of batches (0: off; True: 1)."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise MisconfigurationError(
            f"`fast_dev_run={value!r}` is not supported: use True (1 batch), False, or an "
            "integer n >= 0 (n batches of train, val and test)."
        )
    return value


def check_overfit_batches(value: Any) -> int | float:
    """``overfit_batches``: a number of batches (int >= 0) or a fraction in [0, 1] (0: off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value_ok = False
    elif isinstance(value, int):
        value_ok = value >= 0
    else:
        value_ok = 0.0 <= value <= 1.0
    if not value_ok:
        raise MisconfigurationError(
            f"`overfit_batches={value!r}` is not supported: use an integer number of batches "
            ">= 0, or a fraction between 0.0 and 1.0 (0 or 0.0: off)."
        )
    return value


def with_model_summary(callbacks: list[Callback], enabled: Any) -> list[Callback]:
    """``callbacks`` with a ``ModelSummary()`` added when ``enable_model_summary`` and none is
    given (``enable_model_summary=False`` with one given is an error)."""
    from ember.callbacks.model_summary import ModelSummary

    if not isinstance(enabled, bool):
        raise MisconfigurationError(
            f"`enable_model_summary={enabled!r}` is not supported: use True or False."
        )
    given = any(isinstance(callback, ModelSummary) for callback in callbacks)
    if given and not enabled:
        raise MisconfigurationError(
            "`enable_model_summary=False` but a ModelSummary was passed in `callbacks`; remove one."
        )
    return callbacks + [ModelSummary()] if enabled and not given else callbacks


def without_writers(callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` less those that write checkpoints, judge metrics (EarlyStopping), need
    a logger (LearningRateMonitor) or print a summary: what ``fast_dev_run`` leaves out."""
    from ember.callbacks.lr_monitor import LearningRateMonitor
    from ember.callbacks.model_summary import ModelSummary

    return [
        callback
        for callback in callbacks
        if not (
            type(callback).writes_checkpoints
            or type(callback).monitors
            or isinstance(callback, (LearningRateMonitor, ModelSummary))
        )
    ]


def overfit_loaders(train: Any, val: Any, validates: bool) -> tuple[Any, Any]:
    """The loaders of a fit under ``overfit_batches``: the training loader unshuffled (a
    ``RandomSampler`` replaced by a ``SequentialSampler``, with a warning, as Lightning does),
    and, when the module validates, that same loader for validation, so it validates on the
    batches it trains on."""
    if isinstance(train, DataLoader) and isinstance(train.sampler, RandomSampler):
        warnings.warn(
            "overfit_batches: the training loader shuffles; ember turns shuffling off so every "
            "epoch trains on the same first batches.",
            UserWarning,
            stacklevel=3,
        )
        train = DataLoader(
            train.dataset,
            batch_size=train.batch_size,
            shuffle=False,
            drop_last=train.drop_last,
            **loading_options(train),
        )
    if validates:
        if val is not None:
            warnings.warn(
                "overfit_batches: validation runs on the training batches; the validation "
                "loaders given are not used.",
                UserWarning,
                stacklevel=3,
            )
        val = train
    return train, val
