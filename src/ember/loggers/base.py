"""The ``Logger`` interface the Trainer writes to.

The Trainer calls loggers only on the global-zero process, so a logger never checks ranks:
``log_hyperparams`` once when fit starts, ``log_metrics`` every ``log_every_n_steps`` steps and
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

from ember.loggers.lifecycle import forget


class Logger(ABC):
    """Base class of loggers: subclass it to send metrics anywhere.

    Implement ``name``, ``version``, ``log_metrics`` and ``log_hyperparams``; override
    ``log_dir`` when the logger writes local files, ``save`` when it buffers, and
    ``finalize`` when it holds something to close (the Trainer calls it once per run, at
    process exit, unless you call it first; call ``self.save()`` there if you buffer).
    Override ``checkpoint_state`` and ``continue_run`` to continue the same run when a fit
    resumes from a checkpoint.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a subclass's own ``finalize`` so that any call of it (yours, or the exit
        hook's) tells the exit hook that this run is finished: it is not finalized twice."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("finalize")
        if own is not None and not getattr(own, "_forgets", False):

            @functools.wraps(own)
            def finalize(self: Logger, status: str) -> None:
                forget(self)
                own(self, status)

            finalize._forgets = True  # type: ignore[attr-defined]
            cls.finalize = finalize  # type: ignore[method-assign]

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
        forget(self)
        self.save()

    def finalizer(self) -> Callable[[str], None] | None:
        """A function that ends the run like ``finalize`` but holds no reference to the logger.

        The Trainer asks for it after each call and runs it with the run's status if the
        logger is garbage-collected before the process exits (a sweep that builds a new
        logger per trial), since ``finalize`` cannot run on a collected object. Return None
        (the default) when nothing needs closing: the data was flushed by ``save()``.
        """
        return None

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
