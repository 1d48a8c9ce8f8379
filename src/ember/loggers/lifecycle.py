"""A logger's run: as long as the logger object, across Trainer calls, in one folder per run.

At the start of each ``fit`` / ``validate`` / ``test`` / ``predict`` the Trainer calls
``start_call``: an evaluation or prediction logs the hyperparameters of the module (and
datamodule) when the run does not have them yet, or they changed (``fit`` logs them itself,
after resuming the checkpoint's run).

After each ``fit`` / ``validate`` / ``test`` / ``predict`` the Trainer calls ``end_call``:
every logger is flushed (``save()``), not finished, so the next call writes into the same run.
Each logger is finished once, with ``finalize(status)``, when the process exits (``atexit``),
unless the user finalized it before; a logger garbage-collected before exit (a sweep that
makes a logger per trial) is finished then, by the function its ``finalizer()`` returned
after its last call (``finalize`` cannot run on a collected object). The status given then
is the worst of the calls that wrote into it: "failed" when any call failed, else
"interrupted" when any was interrupted, else "success". A later call after a failed one does
not make the run a success.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ember.loggers import _steps

if TYPE_CHECKING:
    from ember.accelerator import Accelerator
    from ember.datamodule import DataModule
    from ember.loggers.base import Logger
    from ember.module import TrainModule

# Worse statuses have higher ranks: a run keeps the worst status of its calls.
_RANK = {"success": 0, "interrupted": 1, "failed": 2}

# Every logger a Trainer call has used and nobody has finalized yet, with its run's status
# and its ``finalizer()``, by id (a logger need not be hashable). Weak references: a logger
# the user dropped is not kept alive by this; its finalizer ends its run when it is collected.
_open_runs: dict[int, tuple[weakref.ref[Logger], str, Callable[[str], None] | None]] = {}


# The hyperparameters each logger's run holds (merged over its log_hyperparams calls), by id,
# with a weak reference to tell a reused id from the logger that logged them.
_logged_hparams: dict[int, tuple[weakref.ref[Logger], dict[str, Any]]] = {}


def start_call(
    loggers: list[Logger],
    accelerator: Accelerator,
    stage: str,
    module: TrainModule,
    datamodule: DataModule | None,
) -> None:
    """Prepare ``loggers`` for a Trainer call of ``stage``, on every process.

    In a multi-process run, global rank zero's runs (``shared_run()``: version folders, W&B
    ids) are broadcast, and every other rank's loggers follow them (``follow_run``): there
    ``log_dir`` and ``version`` name rank zero's folder and nothing is created or started.
    Then, on global rank zero, for ``validate`` / ``test`` / ``predict``: log the hyperparameters
    of ``datamodule`` and ``module`` (the module's win, as in ``fit``) to each logger whose
    run does not hold them already. ``fit`` logs them itself once the checkpoint's run, if
    any, is resumed: logging before would pick a folder or start a run too early.
    """
    if accelerator.num_processes > 1 and loggers:
        shared = [logger.shared_run() for logger in loggers] if accelerator.is_main_process else []
        shared = accelerator.broadcast(shared)
        if not accelerator.is_main_process:
            for logger, run in zip(loggers, shared, strict=False):
                logger.follow_run(run)
    if not accelerator.is_main_process:
        return
    if stage == "fit":
        for logger in loggers:
            _steps.start_fit(logger)
        return
    hparams = {**(datamodule.hparams if datamodule is not None else {}), **module.hparams}
    if not hparams:
        return
    for logger in loggers:
        entry = _logged_hparams.get(id(logger))
        held = entry[1] if entry is not None and entry[0]() is logger else {}
        if any(key not in held or not _same(held[key], value) for key, value in hparams.items()):
            logger.log_hyperparams(hparams)


def _same(old: Any, new: Any) -> bool:
    """Whether a hyperparameter kept its value (tensors and arrays compared as a whole)."""
    if old is new:
        return True
    try:
        return bool(old == new)
    except Exception:  # an array's == is elementwise, or the types refuse to compare
        return False


def note_hyperparams(logger: Logger, params: dict[str, Any]) -> None:
    """Remember that ``logger``'s run holds ``params`` (called by every ``log_hyperparams``)."""
    entry = _logged_hparams.get(id(logger))
    held = entry[1] if entry is not None and entry[0]() is logger else {}
    key = id(logger)

    def collected(_: weakref.ref[Logger]) -> None:
        _logged_hparams.pop(key, None)

    _logged_hparams[key] = (weakref.ref(logger, collected), {**held, **params})


def end_call(loggers: Iterable[Logger], status: str) -> None:
    """Flush ``loggers`` after a Trainer call that ended with ``status``; finish them at exit.

    Every logger is flushed even when one of them raises; the first error is raised after.
    """
    error: BaseException | None = None
    for logger in loggers:
        key = id(logger)
        previous = _open_runs[key][1] if key in _open_runs else "success"
        worst = max(previous, status, key=lambda value: _RANK.get(value, 2))
        try:
            logger.save()
            finalizer = logger.finalizer()
        except Exception as exception:  # the others are still flushed
            error = error or exception
            finalizer = None
        _open_runs[key] = (weakref.ref(logger, _dropped(key)), worst, finalizer)
    # Registered again after each call: atexit runs the latest registration first, so this
    # runs before the exit hooks of libraries imported during the call (wandb's own).
    atexit.unregister(finish_open_runs)
    atexit.register(finish_open_runs)
    if error is not None:
        raise error


def _dropped(key: int) -> Callable[[weakref.ref[Logger]], None]:
    """The callback that ends the run of the logger of id ``key`` once it is garbage."""

    def callback(reference: weakref.ref[Logger]) -> None:
        entry = _open_runs.get(key)
        if entry is None or entry[0] is not reference:
            return  # finalized already, or the id was reused by a newer logger
        _open_runs.pop(key, None)
        _, status, finalizer = entry
        if finalizer is not None:
            _run_finalizer(finalizer, status, "a garbage-collected logger's finalizer")

    return callback


def run_status(logger: Logger) -> str | None:
    """The status ``finalize`` will get at exit, or None when no call is waiting on it."""
    entry = _open_runs.get(id(logger))
    return entry[1] if entry is not None else None


def forget(logger: Logger) -> None:
    """Stop finishing ``logger`` at exit: its ``finalize`` was called (by the user). Its next
    run starts without hyperparameters."""
    _open_runs.pop(id(logger), None)
    _logged_hparams.pop(id(logger), None)


def finish_open_runs() -> None:
    """Finalize every logger still open with the worst status of its calls (run at exit)."""
    for key, (reference, status, _) in list(_open_runs.items()):
        _open_runs.pop(key, None)
        logger = reference()
        if logger is not None:
            _run_finalizer(logger.finalize, status, f"{type(logger).__name__}.finalize")


def _run_finalizer(finalizer: Callable[[str], None], status: str, what: str) -> None:
    """``finalizer(status)``; an error is a warning (at exit or in gc: nobody to raise to)."""
    try:
        finalizer(status)
    except Exception as error:
        warnings.warn(f"{what}({status!r}) failed: {error!r}", RuntimeWarning, stacklevel=1)


def share_run_folders(loggers: list[Logger]) -> None:
    """Make the file loggers of one Trainer that write to the same ``save_dir/name`` share one
    ``version_N`` folder, so that e.g. ``metrics.csv`` and the event files of a run sit
    side by side.

    Only loggers built with ``version=None`` are joined, and one of each class (two
    ``CSVLogger`` would write the same ``metrics.csv``: the second keeps a folder of its
    own). The group's folder is the one a logger of it already picked (its ``log_dir`` was
    read), else the first's; a logger that already picked another folder keeps it (it may
    have written there).
    """
    from ember.loggers._files import FolderLogger  # here: _files imports base, which imports this

    groups: dict[str, list[FolderLogger]] = {}
    for logger in loggers:
        if isinstance(logger, FolderLogger) and not logger._folder.explicit:
            groups.setdefault(os.path.abspath(logger._folder.root), []).append(logger)
    for members in groups.values():
        leader = next((m for m in members if m._folder.picked), members[0])
        joined = {type(leader)}
        for member in members:
            # Two loggers of one class would write the same files: the second keeps its own.
            if not member._folder.picked and type(member) not in joined:
                member._folder = leader._folder
                joined.add(type(member))
