"""The ``Logger`` interface the Trainer writes to.

The Trainer calls loggers only on the global-zero process, so a logger never checks ranks:
``log_hyperparams`` once when fit starts, ``log_metrics`` every ``log_every_n_steps`` steps and
at each epoch end, ``save`` after each epoch, and ``finalize`` when the run ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Logger(ABC):
    """Base class of loggers: subclass it to send metrics anywhere.

    Implement ``name``, ``version``, ``log_metrics`` and ``log_hyperparams``; override
    ``log_dir`` when the logger writes local files, ``save`` when it buffers, and
    ``finalize`` when it holds something to close (call ``self.save()`` there, or
    ``super().finalize(status)``).
    """

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
        """Flush what is buffered (called after every epoch)."""

    def finalize(self, status: str) -> None:
        """The run ended with ``status`` ("success", "failed" or "interrupted")."""
        self.save()
