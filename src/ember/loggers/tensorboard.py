"""``TensorBoardLogger``: event files that TensorBoard reads, plus ``hparams.yaml``.

Needs the ``tensorboard`` package (``pip install "ember[tensorboard]"``). It is imported when
the writer is first needed, never when ``ember.loggers`` is imported.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import MisconfigurationError
from ember.loggers._files import (
    FolderLogger,
    VersionedFolder,
    is_installed,
    missing_extra_message,
    require,
    sanitize,
    write_hparams_yaml,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

_LOGGER = "TensorBoardLogger"
# The start of an event file's name, with the second it was opened in.
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (checked without importing it)."""
    return is_installed("tensorboard")


class TensorBoardLogger(FolderLogger):
    """Write scalars and hyperparameters to event files in ``save_dir/name/version_N``.

    Each metric is a scalar under its logged name at the given step. Hyperparameters go to
    TensorBoard's HParams tab (nested dicts flattened to ``outer/inner``) and to
    ``hparams.yaml`` next to the event files. In the HParams tab each run (version folder)
    is a row: its hyperparameters, then one column per scalar holding the scalar's latest
    value (TensorBoard reads it from the run's scalars, so it is the final metric once the
    run ended), and the run's status: "success" once ``finalize("success")`` ran, else
    none (TensorBoard shows the first status a folder holds, and a failed run may be resumed
    into the same folder; the failure shows in the Trainer's error and in W&B).

    Creating the logger checks that ``tensorboard`` is installed, without importing it, and
    touches nothing on disk. The version folder is picked and created on first use, like
    ``CSVLogger``'s; the ``SummaryWriter`` is created on the first write or ``experiment`` read.
    A fit resumed from a checkpoint continues the checkpoint's version folder (unless a
    ``version`` was given), hiding the events of steps after the resumed one: see
    ``continue_run``.

    Args:
        save_dir: the folder holding all experiments (what ``tensorboard --logdir`` takes).
        name: the experiment's folder inside ``save_dir`` ("" puts versions in ``save_dir``).
        version: ``None`` for the next free ``version_N``; an int ``N`` for ``version_N``; a
            str used as the folder name.

    Raises:
        ModuleNotFoundError: ``tensorboard`` is not installed; the message names the
            ``pip install`` to run.

    Examples:
        ```python
        import ember
        from ember.loggers import TensorBoardLogger

        logger = TensorBoardLogger("tb_logs", name="mnist")  # tb_logs/mnist/version_0
        trainer = ember.Trainer(max_epochs=10, logger=logger)
        trainer.fit(module, train_loader, val_loader)
        logger.experiment.add_histogram("weights", module.layer.weight, trainer.global_step)
        ```

        Then ``tensorboard --logdir tb_logs`` shows every version of every experiment.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        name: str = "ember",
        version: int | str | None = None,
    ) -> None:
        require("tensorboard", "tensorboard", _LOGGER)
        self._folder = VersionedFolder(save_dir, name, version)
        self._writer: SummaryWriter | None = None
        self._hparams: dict[str, Any] = {}
        self._hparams_in_events = False
        # tensorboard's Summary protobuf class, imported on the first log_metrics.
        self._summary: Any = None
        # Set by continue_run: the next writer opened hides the events from this step on.
        self._purge_step: int | None = None

    @property
    def experiment(self) -> SummaryWriter:
        """The ``torch.utils.tensorboard.SummaryWriter``, created on first read.

        Use it for what ``log_metrics`` does not cover, e.g. ``add_histogram`` or ``add_image``.
        """
        if self._writer is None:
            try:
                import tensorboard  # noqa: F401  (torch's own check raises a vaguer error)
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ModuleNotFoundError(
                    missing_extra_message("tensorboard", "tensorboard", _LOGGER),
                    name="tensorboard",
                ) from error
            if self._purge_step is not None:
                _wait_to_sort_after(self._folder.path)
            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=self._purge_step)
            self._purge_step = None
        return self._writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Add each metric as a scalar under its name at ``step`` (one event for all of them).

        What ``SummaryWriter.add_scalar`` writes (a ``simple_value`` per name), built here as
        one summary per call: a few times cheaper than one ``add_scalar`` per metric.
        """
        if not metrics:
            return
        file_writer = self._file_writer()
        if self._summary is None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            self._summary = Summary
        values = [
            self._summary.Value(tag=name, simple_value=_as_float(name, value))
            for name, value in metrics.items()
        ]
        file_writer.add_summary(self._summary(value=values), global_step=step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Write ``params`` to ``hparams.yaml`` and, on the first call, to the HParams tab, now.

        Both are on disk when this returns (the event is flushed), so a run that crashes in
        its first epoch still shows its hyperparameters. Later calls merge into earlier ones
        in ``hparams.yaml``; the HParams tab keeps those of the first call (TensorBoard reads
        only the first session start of a run: the Trainer logs all hyperparameters in one
        call). Values are sanitized like ``CSVLogger``'s; in the HParams tab, lists, bools and
        None are shown as text.
        """
        self._hparams.update(params)
        write_hparams_yaml(self._folder.path, self._hparams)
        if not self._hparams_in_events and self._hparams:
            self._write_hparams_summary()
            self.experiment.flush()

    def save(self) -> None:
        """Flush pending events."""
        if self._writer is not None:
            self._writer.flush()

    def finalize(self, status: str) -> None:
        """Record a "success" in the HParams tab (if hparams were logged); close the writer.

        The Trainer does not call this after each ``fit`` / ``test`` (it calls ``save``): it
        runs once, at process exit, or when the logger is garbage-collected before that
        (see ``finalizer``), unless you call it first. A later write opens a new event
        file in the same folder.
        """
        if self._writer is None:
            return
        _end_session(self._writer, self._hparams_in_events, status)
        self._writer = None

    def finalizer(self) -> Callable[[str], None] | None:
        """Record the status and close the writer once this logger is garbage-collected."""
        if self._writer is None:
            return None
        return functools.partial(_end_collected, self._writer, self._hparams_in_events)

    def continue_run(self, state: dict[str, Any], step: int) -> None:
        """Continue the checkpoint's version folder, hiding its events of steps after ``step``.

        With ``version=None``, the logger takes the version in ``state`` (see
        ``checkpoint_state``), unless it already wrote to a folder of its own, which it then
        keeps (with a warning); a folder only picked, and still empty, is given up. A
        ``version`` given to the constructor always wins. The next ``SummaryWriter`` opened
        is given ``purge_step=step + 1``: TensorBoard then ignores the folder's earlier events
        of steps after ``step``, which the resumed fit logs again. A writer already open is
        closed for that (a later ``experiment`` read opens the new one).
        """
        self._continue_version(state)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1

    def _write_hparams_summary(self) -> None:
        """Write the HParams tab's session start (the hyperparameters), once per logger."""
        from torch.utils.tensorboard.summary import hparams

        # Only the session start: no experiment summary. TensorBoard then builds the HParams
        # tab from every run's session start, with one metric column per scalar of the runs,
        # showing each scalar's latest value. An experiment summary would fix the columns to
        # those it names, and TensorBoard reads one for all runs under its --logdir.
        _, session_start, _ = hparams(_flatten(sanitize(self._hparams)), metric_dict={})
        self._file_writer().add_summary(session_start)
        self._hparams_in_events = True

    def _file_writer(self) -> Any:
        # torch annotates `file_writer` by its first value, None; the constructor sets it.
        return self.experiment.file_writer


def _wait_to_sort_after(folder: Path) -> None:
    """Sleep, if needed, until an event file opened now sorts after those in ``folder``.

    TensorBoard reads a folder's event files in name order. A name starts with the second
    the file was opened in, then the host, the process id and a per-process counter that is
    not zero-padded, so two files of the same second can sort backwards (counter 10 before
    9). A purge read before the events it should hide hides nothing: when a file of this
    second is there already, the purging writer waits for the next second (at most 1 s, and
    only when a writer was opened in this folder within the same second, as in tests).
    """
    now = time.time()
    seconds = (
        int(match.group(1)) for path in folder.iterdir() if (match := _EVENT_FILE.match(path.name))
    )
    if int(now) in seconds:
        time.sleep(int(now) + 1 - now)


def _end_session(writer: SummaryWriter, has_hparams: bool, status: str) -> None:
    """Write a "success" to the HParams tab (for a run that has hyperparameters); close."""
    # Only a success is written: TensorBoard keeps the first status a folder holds, and
    # a failed or interrupted run may be resumed into the same folder and succeed.
    if has_hparams and status == "success":
        writer.file_writer.add_summary(_session_end_summary())  # type: ignore[attr-defined]
    writer.close()


def _end_collected(writer: SummaryWriter, has_hparams: bool, status: str) -> None:
    """``_end_session`` for a collected logger, unless its folder was removed meanwhile
    (nothing to record there, and the writer's flush would fail in its thread)."""
    if Path(writer.log_dir).is_dir():
        _end_session(writer, has_hparams, status)


def _session_end_summary() -> Any:
    """The HParams plugin's "session ended" summary: a success, at the time now."""
    # Built by hand: tensorboard's own helper for it imports tensorflow.
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.metadata import (
        PLUGIN_DATA_VERSION,
        PLUGIN_NAME,
        SESSION_END_INFO_TAG,
    )
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    session_end = SessionEndInfo(
        status=Status.Value("STATUS_SUCCESS"),
        end_time_secs=time.time(),
    )
    content = HParamsPluginData(session_end_info=session_end, version=PLUGIN_DATA_VERSION)
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)])


def _as_float(name: str, value: Any) -> float:
    """``value`` (a number, one-element tensor or numpy scalar) as a float."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise MisconfigurationError(
            f"The metric {name!r} has the value {value!r} ({type(value).__name__}); loggers "
            "accept numbers and one-element tensors. Log a number instead."
        ) from error


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``outer/inner`` keys; values TensorBoard cannot show become str."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}/"))
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            flat[name] = value
        else:
            # TensorBoard would show a bool as 1.0 and drop None: text reads as it was given.
            flat[name] = str(value)
    return flat
