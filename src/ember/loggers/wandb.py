"""``WandbLogger``: metrics and hyperparameters to a Weights & Biases run.

Needs the ``wandb`` package (``pip install "ember[wandb]"``). It is imported, and the run
started, when the logger is first used, never when ``ember.loggers`` is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ember.loggers._files import missing_extra_message, require, sanitize
from ember.loggers.base import Logger

_LOGGER = "WandbLogger"


class WandbLogger(Logger):
    """Send metrics and hyperparameters to a W&B run, started on first use.

    With ``offline=True``, or the environment variable ``WANDB_MODE=offline``, nothing goes
    to the network: the run is written under ``save_dir/wandb/offline-run-*`` and can be
    uploaded later with ``wandb sync``.

    Creating the logger checks that ``wandb`` is installed, without importing it. The first
    use (a log call, or reading ``experiment``, ``name``, ``version`` or ``log_dir``) imports
    wandb and calls ``wandb.init``; when a run is already active (you called ``wandb.init``
    yourself), that run is used instead of starting another.

    Args:
        project: the W&B project; None lets wandb choose (``WANDB_PROJECT`` or its default).
        name: the run's display name; None lets wandb choose.
        save_dir: the folder in which wandb creates its ``wandb/`` folder (created if missing).
        offline: write the run locally only.
        **init_kwargs: passed on to ``wandb.init``, e.g. ``entity``, ``tags``, ``group``.

    Raises:
        ModuleNotFoundError: ``wandb`` is not installed; the message names the
            ``pip install`` to run.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        save_dir: str | os.PathLike[str] = ".",
        offline: bool = False,
        **init_kwargs: Any,
    ) -> None:
        require("wandb", "wandb", _LOGGER)
        self._project = project
        self._name = name
        self._save_dir = Path(save_dir)
        self._offline = offline
        self._init_kwargs = init_kwargs
        self._run: Any = None

    @property
    def experiment(self) -> Any:
        """The ``wandb`` run, started on first read: use it for tables, media, artifacts."""
        if self._run is None:
            try:
                import wandb
            except ImportError as error:
                raise ModuleNotFoundError(
                    missing_extra_message("wandb", "wandb", _LOGGER), name="wandb"
                ) from error
            if wandb.run is not None:
                self._run = wandb.run
            else:
                # wandb warns and falls back to a temporary folder when `dir` does not exist.
                self._save_dir.mkdir(parents=True, exist_ok=True)
                self._run = wandb.init(
                    project=self._project,
                    name=self._name,
                    dir=str(self._save_dir),
                    # None leaves the choice to wandb, which honours WANDB_MODE.
                    mode="offline" if self._offline else None,
                    **self._init_kwargs,
                )
        return self._run

    @property
    def name(self) -> str:
        """The run's name (its id when wandb gave it none, as offline runs may be)."""
        run = self.experiment
        return str(run.name or run.id)

    @property
    def version(self) -> str:
        """The run's id."""
        return str(self.experiment.id)

    @property
    def log_dir(self) -> str:
        """The run's local files folder (``run.dir``)."""
        return str(self.experiment.dir)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """``run.log(metrics, step=step)``; calls with the same step land in the same row.

        W&B ignores (with a warning) a step lower than one already logged.
        """
        self.experiment.log(dict(metrics), step=step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Add ``params`` (sanitized like ``hparams.yaml``) to the run's config."""
        self.experiment.config.update(sanitize(params), allow_val_change=True)

    def finalize(self, status: str) -> None:
        """Finish the run: exit code 0 for "success", 1 otherwise (shown as failed).

        Does nothing when no run was started; a later use starts a new run.
        """
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "success" else 1)
            self._run = None
