"""``WandbLogger``: metrics and hyperparameters to a Weights & Biases run.

Needs the ``wandb`` package (``pip install "ember[wandb]"``). It is imported, and the run
started, when the logger is first used, never when ``ember.loggers`` is imported.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.loggers._files import missing_extra_message, require, sanitize
from ember.loggers.base import Logger
from ember.loggers.lifecycle import run_status

_LOGGER = "WandbLogger"


class WandbLogger(Logger):
    """Send metrics and hyperparameters to a W&B run, started on first use.

    With ``offline=True``, or the environment variable ``WANDB_MODE=offline``, nothing goes
    to the network: the run is written under ``save_dir/wandb/offline-run-*`` and can be
    uploaded later with ``wandb sync``.

    Creating the logger checks that ``wandb`` is installed, without importing it. The first
    use (a log call, or reading ``experiment``, ``name``, ``version`` or ``log_dir``) imports
    wandb and calls ``wandb.init``: each logger object has a run of its own. When a run you
    started yourself with ``wandb.init`` is active, that run is used instead of starting
    another. When the active run is another ``WandbLogger``'s (a sweep or notebook making a
    logger per trial), that run is finished first, with the status of its Trainer calls so
    far (see ``ember.loggers.lifecycle``), and a new run is started.

    A fit resumed from a checkpoint continues the checkpoint's run (unless an ``id`` was
    given) and logs only the steps after the resumed one: see ``continue_run``.

    Args:
        project: the W&B project; None lets wandb choose (``WANDB_PROJECT`` or its default).
        name: the run's display name; None lets wandb choose.
        save_dir: the folder in which wandb creates its ``wandb/`` folder (created if missing).
        offline: write the run locally only.
        **init_kwargs: passed on to ``wandb.init``, e.g. ``entity``, ``tags``, ``group``.

    Raises:
        ModuleNotFoundError: ``wandb`` is not installed; the message names the
            ``pip install`` to run.

    Examples:
        ```python
        import ember
        from ember.loggers import WandbLogger

        logger = WandbLogger(project="mnist", name="baseline", tags=["cnn"])
        trainer = ember.Trainer(max_epochs=10, logger=logger)
        trainer.fit(module, train_loader, val_loader)
        logger.experiment.summary["best_val_loss"] = 0.12  # the wandb run itself
        ```

        Without a network, ``WandbLogger(project="mnist", offline=True)`` writes the run
        under ``./wandb/``; ``wandb sync`` uploads it later.
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
        # On a rank other than global zero: rank zero's run ({} before it started one).
        self._followed: dict[str, Any] | None = None
        # The run finalize() finished last: name, version and log_dir still describe it.
        self._finished: Any = None
        # The id of the last run this logger used; it stays known after finalize().
        self._run_id: str | None = None
        # Set by continue_run: the run to resume, and the last step it keeps.
        self._resume_id: str | None = None
        self._resumed_step: int | None = None

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
            _finish_runs_of_other_loggers(wandb.run)
            if wandb.run is not None:  # the user's own wandb.init: log into it
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
                    **self._init_arguments(),
                )
                _runs_of_loggers[id(self._run)] = weakref.ref(self)
            self._run_id = str(self._run.id)
        return self._run

    @property
    def name(self) -> str:
        """The run's name (its id when wandb gave it none, as offline runs may be)."""
        if self._followed is not None:
            return str(self._followed.get("name", self._name or ""))
        run = self._current_or_last_run()
        return str(run.name or run.id)

    @property
    def version(self) -> str | None:
        """The run's id (after ``finalize``, the finished run's: reading it starts nothing).

        On a process other than global rank zero: rank zero's run id, as it was at the start
        of the current Trainer call (None when rank zero had not started its run then).
        """
        if self._followed is not None:
            return self._followed.get("id")
        return str(self._current_or_last_run().id)

    @property
    def log_dir(self) -> str | None:
        """The run's local files folder (``run.dir``; rank zero's on the other ranks)."""
        if self._followed is not None:
            return self._followed.get("dir")
        return str(self._current_or_last_run().dir)

    def shared_run(self) -> dict[str, Any]:
        """The run's id, name and folder once it started; ``{}`` before (nothing is started:
        a fit may still resume the checkpoint's run)."""
        run = self._run if self._run is not None else self._finished
        if run is None:
            return {}
        return {"id": str(run.id), "name": str(run.name or run.id), "dir": str(run.dir)}

    def follow_run(self, shared: dict[str, Any]) -> None:
        """Answer ``name``, ``version`` and ``log_dir`` from rank zero's run; start none."""
        self._followed = dict(shared)

    def _current_or_last_run(self) -> Any:
        """The active run, else the one ``finalize`` finished, else a new one (started)."""
        if self._run is None and self._finished is not None:
            return self._finished
        return self.experiment

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """``run.log(metrics, step=step)``; calls with the same step land in the same row.

        W&B ignores (with a warning) a step lower than one already logged. After
        ``continue_run(state, s)``, steps up to ``s`` are dropped here: the resumed run
        already has them.
        """
        if self._resumed_step is not None and step <= self._resumed_step:
            return
        self.experiment.log(dict(metrics), step=step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Add ``params`` (sanitized like ``hparams.yaml``) to the run's config."""
        self.experiment.config.update(sanitize(params), allow_val_change=True)

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"id": run id}`` once a run was used; ``{}`` before (no run is started for it)."""
        return {} if self._run_id is None else {"id": self._run_id}

    def continue_run(self, state: dict[str, Any], step: int) -> None:
        """Resume the checkpoint's run, and log only the steps after ``step`` from now on.

        Without an ``id`` among the ``wandb.init`` arguments, the run to start is the one
        whose id ``state`` holds (see ``checkpoint_state``); an ``id`` given to the
        constructor always wins. Either way the run is started with ``resume="allow"``
        (unless you passed ``resume``). A run already started is kept: this logger's (with a
        warning when its id is not the checkpoint's), or yours from ``wandb.init``. Offline,
        wandb writes a new ``offline-run-*`` folder with the same id, which ``wandb sync``
        uploads into that run.
        """
        saved = state.get("id")
        self._resumed_step = step
        if saved is None or self._init_kwargs.get("id") is not None:
            return
        self._resume_id = str(saved)
        if self._run is not None and str(self._run.id) != self._resume_id:
            warnings.warn(
                f"WandbLogger already uses the run {self._run.id!r}, so the resumed fit logs "
                f"there instead of continuing the checkpoint's run {saved!r}. Let the Trainer "
                f"resume before the run starts, or pass `id={saved!r}` to continue that run.",
                UserWarning,
                stacklevel=2,
            )

    def _init_arguments(self) -> dict[str, Any]:
        """The extra ``wandb.init`` arguments: the user's, plus the run to resume if any."""
        arguments = dict(self._init_kwargs)
        if self._resume_id is not None:
            arguments["id"] = self._resume_id
        if self._resumed_step is not None and arguments.get("id") is not None:
            arguments.setdefault("resume", "allow")
        return arguments

    def finalizer(self) -> Callable[[str], None] | None:
        """Finish this logger's run once the logger is garbage-collected (if still active).

        None for a run you started with ``wandb.init``: other loggers may still log into it.
        """
        if self._run is None or id(self._run) not in _runs_of_loggers:
            return None
        return functools.partial(_finish, self._run)

    def finalize(self, status: str) -> None:
        """Finish the run: exit code 0 for "success", 1 otherwise (shown as failed).

        The Trainer does not call this after each ``fit`` / ``test``: every call writes into
        the same run, finished once at process exit (with "failed" when any call failed)
        unless you call this first. Does nothing when no run was started; a later use
        starts a new run (after ``continue_run``, resumes the checkpoint's run again).
        """
        if self._run is not None:
            _finish(self._run, status)
            self._finished, self._run = self._run, None


# The runs that WandbLogger objects started (by id of the run object), with their logger: a
# new logger finishes such a run rather than adopting it, unlike a run the user started.
_runs_of_loggers: dict[int, weakref.ref[WandbLogger]] = {}


def _finish(run: Any, status: str) -> None:
    """Finish ``run`` with exit code 0 for "success", 1 otherwise (shown as failed)."""
    _runs_of_loggers.pop(id(run), None)
    run.finish(exit_code=0 if status == "success" else 1)


def _finish_runs_of_other_loggers(active: Any) -> None:
    """Finish ``active`` (``wandb.run``) when a ``WandbLogger`` started it, with its status."""
    if active is None or id(active) not in _runs_of_loggers:
        return
    owner = _runs_of_loggers[id(active)]()
    if owner is not None:
        owner.finalize(run_status(owner) or "success")
    else:
        _finish(active, "success")
