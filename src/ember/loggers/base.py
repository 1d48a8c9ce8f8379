"""The ``Logger`` interface the Trainer writes to.

The Trainer calls loggers only on the global-zero process, so a logger never checks ranks
(the other ranks only get ``follow_run`` at the start of each call): ``log_hyperparams``
when fit starts, and when validate / test / predict start with hyperparameters the run does
not hold yet, ``log_metrics`` every ``log_every_n_steps`` steps and
at each epoch end, ``save`` after each epoch and at the end of every Trainer call, and
``finalize`` once, when the process exits or the logger is garbage-collected (see
``ember.loggers.lifecycle``).

A logger's run lasts as long as the logger object: every Trainer call writes into it, and a
fit resumed from a checkpoint continues it: the checkpoint keeps ``checkpoint_state()``, and
``fit(ckpt_path=...)`` hands it back to ``continue_run`` before the resumed fit logs anything.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from ember.loggers import _steps
from ember.loggers.lifecycle import forget, note_hyperparams


class Logger(ABC):
    """Base class of loggers: subclass it to send metrics anywhere.

    Implement ``name``, ``version``, ``log_metrics`` and ``log_hyperparams``; override
    ``log_dir`` when the logger writes local files, ``save`` when it buffers, and
    ``finalize`` when it holds something to close (the Trainer calls it once per run, at
    process exit, unless you call it first; call ``self.save()`` there if you buffer).
    Override ``checkpoint_state`` and ``continue_run`` to continue the same run when a fit
    resumes from a checkpoint.

    Examples:
        A logger that prints, passed to ``Trainer(logger=...)``:

        >>> import ember
        >>> from ember.loggers import Logger
        >>> class PrintLogger(Logger):
        ...     @property
        ...     def name(self) -> str:
        ...         return "print"
        ...
        ...     @property
        ...     def version(self) -> int:
        ...         return 0
        ...
        ...     def log_metrics(self, metrics, step):
        ...         print(f"step {step}: {metrics}")
        ...
        ...     def log_hyperparams(self, params):
        ...         print(f"hparams: {params}")
        >>> logger = PrintLogger()
        >>> logger.log_metrics({"loss": 0.25}, step=10)
        step 10: {'loss': 0.25}
        >>> trainer = ember.Trainer(logger=logger)
        >>> trainer.logger is logger, trainer.log_dir == str(trainer.default_root_dir)
        (True, True)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a subclass's methods with what every logger shares (see ``_shared``)."""
        super().__init_subclass__(**kwargs)
        for name in _WRAPPERS:
            method = getattr(cls, name)
            if not getattr(method, "_shared", False):
                setattr(cls, name, _shared(name, method))

    @property
    @abstractmethod
    def name(self) -> str:
        """The experiment's name."""

    @property
    @abstractmethod
    def version(self) -> int | str | None:
        """The run's version within the experiment."""

    @property
    def log_dir(self) -> str | None:
        """The folder this logger writes to (None when it writes nowhere local)."""
        return None

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` (name -> float) at optimizer step ``step``."""

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Record the run's hyperparameters."""

    def save(self) -> None:  # noqa: B027  (a no-op default: unbuffered loggers skip it)
        """Flush what is buffered (called after every epoch and every Trainer call)."""

    def finalize(self, status: str) -> None:
        """The run ended with ``status`` ("success", "failed" or "interrupted").

        Called once per run: by you, or at process exit with the worst status of the Trainer
        calls that wrote into it. Default: ``save()``.
        """
        self.save()

    def finalizer(self) -> Callable[[str], None] | None:
        """A function that ends the run like ``finalize`` but holds no reference to the logger.

        The Trainer asks for it after each call and runs it with the run's status if the
        logger is garbage-collected before the process exits (a sweep that builds a new
        logger per trial), since ``finalize`` cannot run on a collected object. Return None
        (the default) when nothing needs closing: the data was flushed by ``save()``.
        """
        return None

    def shared_run(self) -> dict[str, Any]:
        """What the other processes of a multi-process run need to name this run (global rank
        zero only; default ``{}``). Plain values: it is broadcast at the start of each Trainer
        call, and handed to the other ranks' ``follow_run``."""
        return {}

    def follow_run(self, shared: dict[str, Any]) -> None:  # noqa: B027  (no-op: nothing to name)
        """On a process other than global rank zero: answer ``version`` and ``log_dir`` from
        rank zero's ``shared_run()``, without creating a folder or starting a run. Default:
        nothing."""

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue this run (default: nothing, ``{}``).

        Plain values only (str, int, float, bool, None, and lists or dicts of these): the
        checkpoint is loaded with ``torch.load(weights_only=True)``.
        """
        return {}

    def continue_run(self, state: dict[str, Any], step: int) -> None:  # noqa: B027  (no-op: nothing kept, nothing to do)
        """Continue the run ``state`` describes: ``fit(ckpt_path=...)`` resumes at ``step``.

        ``state`` is what ``checkpoint_state`` returned when the checkpoint was written (``{}``
        when the checkpoint had nothing for this logger); ``step`` is the optimizer step the
        fit resumes at, so what was logged after it is logged again. Called on global rank
        zero only, before the resumed fit logs anything. Default: nothing.
        """


# What every logger's methods share, around a subclass's own (or the defaults above):
# - finalize: tells the exit hook that this run is finished (it is not finalized twice);
# - log_hyperparams: remembers them, so a later Trainer call of the run does not repeat them;
# - log_metrics, checkpoint_state, continue_run: steps within a run only increase (_steps).
# Only the outermost call does it: an override calling super().log_metrics(...) gets the
# step it passes, not offset twice.
Method = Callable[..., Any]


def _finalize(own: Method, self: Logger, status: str) -> None:
    forget(self)
    own(self, status)


def _log_hyperparams(own: Method, self: Logger, params: dict[str, Any]) -> None:
    own(self, params)
    note_hyperparams(self, params)


def _log_metrics(own: Method, self: Logger, metrics: dict[str, float], step: int) -> None:
    own(self, metrics, _steps.run_step(self, step))


def _checkpoint_state(own: Method, self: Logger) -> dict[str, Any]:
    return _steps.with_offset(self, own(self))


def _continue_run(own: Method, self: Logger, state: dict[str, Any], step: int) -> None:
    own(self, *_steps.resume(self, state, step))


_WRAPPERS: dict[str, Callable[..., Any]] = {
    "finalize": _finalize,
    "log_hyperparams": _log_hyperparams,
    "log_metrics": _log_metrics,
    "checkpoint_state": _checkpoint_state,
    "continue_run": _continue_run,
}
_PARAMETERS = {
    "finalize": ("status",),
    "log_hyperparams": ("params",),
    "log_metrics": ("metrics", "step"),
    "checkpoint_state": (),
    "continue_run": ("state", "step"),
}
# (id of the logger, method name) of the shared calls in progress.
_in_progress: set[tuple[int, str]] = set()


def _shared(name: str, own: Method) -> Method:
    """``own`` with ``_WRAPPERS[name]`` around its outermost call."""
    around, parameters = _WRAPPERS[name], _PARAMETERS[name]

    @functools.wraps(own)
    def method(self: Logger, *args: Any, **kwargs: Any) -> Any:
        # The arguments in order, wherever they were given by name.
        args = (*args, *(kwargs.pop(p) for p in parameters[len(args) :] if p in kwargs))
        if kwargs or len(args) != len(parameters):
            raise TypeError(f"{name}() takes the arguments {parameters}, got {args} {kwargs}")
        key = (id(self), name)
        if key in _in_progress:
            return own(self, *args)
        _in_progress.add(key)
        try:
            return around(own, self, *args)
        finally:
            _in_progress.discard(key)

    method._shared = True  # type: ignore[attr-defined]
    return method
