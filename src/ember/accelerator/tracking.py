"""Experiment tracking for hand-written loops, as Accelerate's ``log_with`` does it, on ember's
own loggers (``ember.loggers``).

::

    accelerator = Accelerator(log_with="tensorboard", project_dir="runs")
    accelerator.init_trackers("my_project", config={"lr": 1e-3})  # runs/my_project/
    accelerator.log({"loss": loss}, step=step)                     # main process only
    accelerator.end_training()                                     # finishes every tracker

Where trackers write, ``init_trackers(project_name)`` with ``project_dir`` (the
Accelerator's, the current directory when none was given):

- ``"tensorboard"``: event files directly in ``<project_dir>/<project_name>/``, as in
  Accelerate (no ``version_N`` folder), with ``hparams.yaml``.
- ``"csv"``: ``<project_dir>/<project_name>/metrics.csv`` and ``hparams.yaml``.
- ``"wandb"``: the W&B project ``project_name``; its local files in ``<dir>/wandb/``, where
  ``dir`` is ``init_kwargs={"wandb": {"dir": ...}}``, else ``WANDB_DIR``, else project_dir.

A rerun with the same project name writes into the same folder: TensorBoard adds an event
file, CSV appends its rows (as Accelerate's TensorBoard tracker does).

Only the main process creates loggers and writes; the other processes check what they are
given the same way and get do-nothing trackers, so one script runs everywhere.

As in Accelerate, ``init_trackers`` may be called on the main process only (``if
accelerator.is_main_process: accelerator.init_trackers(...)``, as the diffusers scripts do):
``log`` then does nothing on the processes that started no trackers, and ``get_tracker``
there returns a blank tracker. ``init_trackers`` without ``log_with`` does nothing. On the
main process, ``log`` with ``log_with`` given but no trackers running (before
``init_trackers``, after ``end_training``) records nothing and warns once, since those values
are lost (Accelerate is silent there).
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import MisconfigurationError
from ember.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from ember.loggers._files import is_installed, require


@dataclass(frozen=True)
class _Kind:
    """One tracker name of ``log_with``: the package it needs and how its logger is built."""

    package: str | None
    logger: type[Logger]
    build: Callable[[Path, str, dict[str, Any]], Logger]
    # What ``log_kwargs`` may pass, and how: (logger, values, step, kwargs) -> None.
    log_with_kwargs: Callable[[Logger, dict[str, float], int, dict[str, Any]], None] | None


def _folder_of(project_dir: Path, project_name: str) -> tuple[Path, str]:
    """``save_dir`` and ``version`` that make a folder logger write in
    ``<project_dir>/<project_name>`` itself (name "" and the last part as the version)."""
    folder = project_dir / project_name
    return folder.parent, folder.name


def _build_csv(project_dir: Path, project_name: str, kwargs: dict[str, Any]) -> Logger:
    save_dir, version = _folder_of(project_dir, project_name)
    _refuse_unknown("csv", kwargs, {"flush_every"})
    return CSVLogger(save_dir, name="", version=version, **kwargs)


def _build_tensorboard(project_dir: Path, project_name: str, kwargs: dict[str, Any]) -> Logger:
    save_dir, version = _folder_of(project_dir, project_name)
    _refuse_unknown("tensorboard", kwargs, set())
    return TensorBoardLogger(save_dir, name="", version=version)


def _build_wandb(project_dir: Path, project_name: str, kwargs: dict[str, Any]) -> Logger:
    arguments = dict(kwargs)
    if "project" in arguments:
        raise MisconfigurationError(
            f"`init_kwargs={{'wandb': {{'project': {arguments['project']!r}}}}}` is not "
            "accepted: the W&B project is `init_trackers`' project_name."
        )
    mode = arguments.pop("mode", None)
    if mode not in (None, "online", "offline"):
        raise MisconfigurationError(
            f"`init_kwargs={{'wandb': {{'mode': {mode!r}}}}}` is not accepted; accepted: "
            '"online" or "offline" (set WANDB_MODE=disabled to turn W&B off).'
        )
    # wandb's own order (an explicit dir, then WANDB_DIR), then project_dir, not the cwd.
    save_dir = arguments.pop("dir", None) or os.environ.get("WANDB_DIR") or project_dir
    return WandbLogger(
        project=project_name,
        name=arguments.pop("name", None),
        save_dir=save_dir,
        offline=mode == "offline",
        **arguments,
    )


def _tensorboard_log(
    logger: Logger, values: dict[str, float], step: int, kwargs: dict[str, Any]
) -> None:
    writer = _underlying(logger)
    for name, value in values.items():
        writer.add_scalar(name, value, global_step=step, **kwargs)


def _wandb_log(logger: Logger, values: dict[str, float], step: int, kwargs: dict[str, Any]) -> None:
    _underlying(logger).log(dict(values), step=step, **kwargs)


_KINDS: dict[str, _Kind] = {
    "csv": _Kind(None, CSVLogger, _build_csv, None),
    "tensorboard": _Kind("tensorboard", TensorBoardLogger, _build_tensorboard, _tensorboard_log),
    "wandb": _Kind("wandb", WandbLogger, _build_wandb, _wandb_log),
}


def _refuse_unknown(name: str, kwargs: Mapping[str, Any], accepted: set[str]) -> None:
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise MisconfigurationError(
            f"`init_kwargs[{name!r}]` has {unknown}, which the {name} tracker does not take; "
            f"accepted: {sorted(accepted) or 'nothing'}."
        )


def _underlying(logger: Logger) -> Any:
    """What Accelerate's ``tracker.tracker`` is: the SummaryWriter, the W&B run; a logger
    with no ``experiment`` (CSV, most custom loggers) is its own underlying object."""
    return getattr(logger, "experiment", logger)


def tracker_name(logger: Logger) -> str:
    """The name ``get_tracker`` knows a logger object by: "csv", "tensorboard", "wandb" for
    ember's (and their subclasses), else the class name."""
    for name, kind in _KINDS.items():
        if isinstance(logger, kind.logger):
            return name
    return type(logger).__name__


def _accepted() -> str:
    return '"tensorboard", "wandb", "csv", "all", a Logger object, or a list of these'


def resolve_log_with(log_with: Any) -> list[str | Logger]:
    """``log_with`` as a list of tracker names and Logger objects; checked on every process.

    "all" gives every tracker whose package is installed; a named tracker whose package is
    missing raises ``ModuleNotFoundError`` naming the ``pip install``.
    """
    if log_with is None:
        return []
    items = list(log_with) if isinstance(log_with, list | tuple) else [log_with]
    resolved: list[str | Logger] = []
    for item in items:
        if isinstance(item, Logger):
            resolved.append(item)
        elif item == "all":
            resolved += [
                name
                for name, kind in _KINDS.items()
                if kind.package is None or is_installed(kind.package)
            ]
        elif isinstance(item, str) and item in _KINDS:
            kind = _KINDS[item]
            if kind.package is not None:
                require(kind.package, kind.package, kind.logger.__name__)
            resolved.append(item)
        else:
            raise MisconfigurationError(
                f"`log_with={log_with!r}` is not accepted ({item!r} is not a tracker); accepted: "
                f"{_accepted()}."
            )
    unique: list[str | Logger] = []
    for item in resolved:  # "all" beside "csv" names csv once
        if not any(item is known or (isinstance(item, str) and item == known) for known in unique):
            unique.append(item)
    return unique


class Tracker:
    """One active tracker, as Accelerate's ``GeneralTracker``: ``name``, ``tracker`` (the
    underlying object: TensorBoard's ``SummaryWriter``, the W&B run, the ``CSVLogger``
    itself), ``logger`` (the ember ``Logger``), ``log``, ``store_init_configuration``,
    ``finish``.

    On processes other than the main one, trackers are blank: nothing is created, every
    method does nothing and ``tracker`` is an object whose every method does nothing.
    """

    def __init__(self, name: str, logger: Logger | None, kind: _Kind | None = None) -> None:
        self.name = name
        self.logger = logger
        self._kind = kind
        self.finished = False

    @property
    def tracker(self) -> Any:
        """The underlying object (created on first read for TensorBoard and W&B)."""
        return _DoNothing() if self.logger is None else _underlying(self.logger)

    def store_init_configuration(self, values: Mapping[str, Any]) -> None:
        """Record the run's configuration (the logger's ``log_hyperparams``)."""
        if self.logger is not None:
            self.logger.log_hyperparams(dict(values))

    def log(self, values: dict[str, float], step: int, **kwargs: Any) -> None:
        """Record ``values`` at ``step``; ``kwargs`` go to the underlying call (W&B's
        ``run.log``, TensorBoard's ``add_scalar``)."""
        self.check_log_kwargs(kwargs)
        if self.logger is None:
            return
        if kwargs and self._kind is not None and self._kind.log_with_kwargs is not None:
            self._kind.log_with_kwargs(self.logger, values, step, kwargs)
        else:
            self.logger.log_metrics(values, step)

    def check_log_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        """Raise ``MisconfigurationError`` when this tracker takes no ``log_kwargs``."""
        if kwargs and (self._kind is None or self._kind.log_with_kwargs is None):
            raise MisconfigurationError(
                f"`log_kwargs={{{self.name!r}: {dict(kwargs)!r}}}` is not accepted: only the "
                '"tensorboard" and "wandb" trackers take log_kwargs.'
            )

    def finish(self) -> None:
        """End the run (``finalize("success")``); a second call does nothing."""
        if self.logger is not None and not self.finished:
            self.logger.finalize("success")
        self.finished = True

    def __repr__(self) -> str:
        return f"Tracker(name={self.name!r}, logger={self.logger!r})"


class _DoNothing:
    """What a blank tracker's ``tracker`` is: any method can be called, nothing happens."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class Trackers:
    """What ``log_with`` asked for, and the trackers ``init_trackers`` started.

    Args:
        log_with: the Accelerator's ``log_with`` (see ``resolve_log_with``).
        is_main_process: whether this process creates loggers and writes.
    """

    def __init__(self, log_with: Any, is_main_process: bool) -> None:
        self.requested = resolve_log_with(log_with)
        self.is_main_process = is_main_process
        self.active: list[Tracker] = []
        #: The step a ``log(step=None)`` uses: one after the last step logged.
        self.next_step = 0
        self._warned_not_started = False

    @property
    def names(self) -> list[str]:
        return [item if isinstance(item, str) else tracker_name(item) for item in self.requested]

    def start(
        self,
        project_dir: Path,
        project_name: str,
        config: Mapping[str, Any] | None,
        init_kwargs: Mapping[str, Any] | None,
    ) -> None:
        """Create each tracker (main process only) and log ``config`` as hyperparameters."""
        if not isinstance(project_name, str) or not project_name:
            raise MisconfigurationError(
                f"`project_name={project_name!r}` is not accepted; pass a non-empty str (the "
                "folder inside project_dir, and the W&B project)."
            )
        if config is not None and not isinstance(config, Mapping):
            raise MisconfigurationError(
                f"`config` is a {type(config).__name__}; pass a dict (e.g. `vars(args)`) or None."
            )
        init_kwargs = dict(init_kwargs or {})
        unknown = sorted(set(init_kwargs) - set(self.names))
        if unknown:
            raise MisconfigurationError(
                f"`init_kwargs` names {unknown}, which are not among the trackers of "
                f"log_with: {self.names}."
            )
        if any(not tracker.finished for tracker in self.active):
            raise MisconfigurationError(
                "`init_trackers` was already called; call `end_training()` before starting "
                "new trackers."
            )
        if not self.requested:
            return  # no log_with: Accelerate's init_trackers does nothing either
        trackers = []
        for item, name in zip(self.requested, self.names, strict=True):
            kwargs = dict(init_kwargs.get(name, {}))
            kind = _KINDS.get(name)  # ember's logger objects too: their log_kwargs work
            if isinstance(item, Logger):
                _refuse_unknown(name, kwargs, set())  # built already: checked everywhere
            if not self.is_main_process:
                trackers.append(Tracker(name, None, kind))
            elif isinstance(item, Logger):
                trackers.append(Tracker(name, item, kind))
            else:
                assert kind is not None
                trackers.append(Tracker(name, kind.build(project_dir, project_name, kwargs), kind))
        self.active = trackers
        self.next_step = 0
        if config is not None:
            for tracker in trackers:
                tracker.store_init_configuration(config)

    def log(
        self,
        values: Mapping[str, Any],
        step: int | None,
        log_kwargs: Mapping[str, Mapping[str, Any]] | None,
    ) -> None:
        """Check ``values`` everywhere; write them at ``step`` on the main process."""
        if not self.requested:
            return  # no log_with: Accelerate's log() does nothing either
        if not self.active or all(tracker.finished for tracker in self.active):
            # As in Accelerate: nothing to write to, nothing written. The other processes
            # often start no trackers at all (`if is_main_process: init_trackers(...)`).
            if self.is_main_process and not self._warned_not_started:
                self._warned_not_started = True
                warnings.warn(
                    "`accelerator.log` was called with no trackers running, so nothing was "
                    f"recorded (log_with={self.names}): call "
                    "`accelerator.init_trackers(project_name)` first (again after "
                    "`end_training()`). This warning is shown once.",
                    stacklevel=3,
                )
            return
        numbers = _as_numbers(values, convert=self.is_main_process)
        step = self.next_step if step is None else _as_step(step)
        log_kwargs = dict(log_kwargs or {})
        unknown = sorted(set(log_kwargs) - set(self.names))
        if unknown:
            raise MisconfigurationError(
                f"`log_kwargs` names {unknown}, which are not among the active trackers: "
                f"{self.names}."
            )
        for tracker in self.active:  # every tracker's kwargs checked before anyone writes
            tracker.check_log_kwargs(log_kwargs.get(tracker.name, {}))
        for tracker in self.active:
            tracker.log(numbers, step, **log_kwargs.get(tracker.name, {}))
        self.next_step = step + 1

    def get(self, name: str, unwrap: bool) -> Any:
        """The tracker called ``name`` (its underlying object with ``unwrap``); with no
        trackers started on this process, a blank one (as Accelerate's)."""
        if not self.active:
            blank = Tracker(name, None, _KINDS.get(name))
            return blank.tracker if unwrap else blank
        for tracker in self.active:
            if tracker.name == name:
                return tracker.tracker if unwrap else tracker
        raise MisconfigurationError(
            f"`get_tracker({name!r})`: no such tracker; the active ones are "
            f"{[tracker.name for tracker in self.active]}."
        )

    def finish(self) -> None:
        """Finish every tracker (``finalize("success")``); a second call does nothing."""
        for tracker in self.active:
            tracker.finish()


def _as_numbers(values: Mapping[str, Any], convert: bool) -> dict[str, float]:
    """``values`` as Python numbers; one-element tensors are read with ``.item()`` only when
    ``convert`` (the other processes only check their shape, without a device sync)."""
    if not isinstance(values, Mapping):
        raise MisconfigurationError(
            f"`log` takes a dict of metric name -> number, got a {type(values).__name__}."
        )
    numbers: dict[str, float] = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise MisconfigurationError(f"`log` got the metric name {name!r}; names are str.")
        if isinstance(value, bool):
            numbers[name] = int(value)
        elif isinstance(value, int | float):
            numbers[name] = value
        elif callable(getattr(value, "item", None)) and _numel(value) == 1:
            numbers[name] = value.item() if convert else 0.0
        else:
            shape = getattr(value, "shape", None)
            given = f"shape {tuple(shape)}" if shape is not None else type(value).__name__
            raise MisconfigurationError(
                f"`log` got {name!r} = a {given} value; accepted: a Python number or a tensor "
                "with one element (e.g. `loss.detach()`, `loss.mean()`). Log a reduction or "
                "one metric per element."
            )
    return numbers


def _numel(value: Any) -> int | None:
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    try:
        return int(size() if callable(size) else size)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _as_step(step: Any) -> int:
    try:
        if isinstance(step, bool):
            raise TypeError
        number = operator.index(step)
    except TypeError:
        number = -1
    if number < 0:
        raise MisconfigurationError(
            f"`log(step={step!r})` is not accepted; pass an int >= 0, or None for one after "
            "the last step logged."
        )
    return number
