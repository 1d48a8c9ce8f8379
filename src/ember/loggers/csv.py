"""``CSVLogger``: metrics in ``metrics.csv`` and hyperparameters in ``hparams.yaml``.

Needs only the standard library and pyyaml, so it is the logger that always works.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, BinaryIO

from ember.errors import MisconfigurationError
from ember.loggers._files import (
    FolderLogger,
    VersionedFolder,
    open_atomically,
    write_hparams_yaml,
)

METRICS_FILE = "metrics.csv"
STEP_COLUMN = "step"


class CSVLogger(FolderLogger):
    """Write metrics to ``save_dir/name/version_N/metrics.csv`` and hparams to ``hparams.yaml``.

    The CSV has a ``step`` column, then one column per metric name in the order the names
    first appeared. A name that appears later extends the header: the file is rewritten once
    with the new header and the older rows get empty cells there.

    Each row reaches the disk when it is logged (an append to the open file, no rewrite), so
    a crash loses nothing the Trainer had sent: with ``log_every_n_steps=n``, at most the last
    ``n`` steps. A call that follows another with the same ``step`` is merged into its row
    (the row on disk is replaced: the file is truncated to its start and the merged row
    appended), unless it names the same metric: then the second value gets a row of its own
    rather than overwriting the first. Pass ``flush_every`` > 1 to keep rows in memory until
    that many wait (or ``save()`` / ``finalize()``).

    Creating the logger touches nothing on disk. The version folder is picked and created on
    first use: the first read of ``version`` or ``log_dir``, or the first write. When
    ``metrics.csv`` already exists there (an explicit ``version`` reused, e.g. on resume),
    new rows are appended to it.

    A fit resumed from a checkpoint continues the checkpoint's version folder (unless a
    ``version`` was given) and first drops the rows of steps after the resumed one, which the
    resumed fit logs again: see ``continue_run``.

    Args:
        save_dir: the folder holding all experiments.
        name: the experiment's folder inside ``save_dir`` ("" puts versions in ``save_dir``).
        version: ``None`` for the next free ``version_N``; an int ``N`` for ``version_N``; a
            str used as the folder name.
        flush_every: write the rows once this many are waiting (1, the default: every row
            is written when logged).

    Examples:
        >>> from ember.loggers import CSVLogger
        >>> logger = CSVLogger("logs")  # logs/ember/version_0/metrics.csv on first use
        >>> logger.log_metrics({"loss": 0.5}, step=1)
        >>> logger.log_metrics({"val_loss": 0.75}, step=2)  # a new column: the header grows
        >>> logger.finalize("success")
        >>> print(logger.metrics_file.read_text())
        step,loss,val_loss
        1,0.5,
        2,,0.75
        >>> from pathlib import Path
        >>> Path(logger.log_dir).as_posix()
        'logs/ember/version_0'

        With the Trainer: ``Trainer(logger=CSVLogger("logs", name="mnist"))``; once that
        run has written, the next ``CSVLogger("logs", name="mnist")`` writes to ``version_1``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        name: str = "ember",
        version: int | str | None = None,
        flush_every: int = 1,
    ) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise MisconfigurationError(
                f"`flush_every={flush_every!r}` is not accepted; pass an int >= 1 "
                "(the number of buffered rows that triggers a write)."
            )
        self._folder = VersionedFolder(save_dir, name, version)
        self.flush_every = flush_every
        self._rows: list[dict[str, float]] = []
        # The header of metrics.csv as it is on disk; None until the first write looks.
        self._columns: list[str] | None = None
        self._hparams: dict[str, Any] = {}
        # metrics.csv opened for appending (unbuffered: each write is one system call).
        self._file: BinaryIO | None = None
        # The last row written by this logger and the offset in the file where it starts.
        self._last_written: tuple[dict[str, float], int] | None = None
        # Set when that row was taken back to be merged: the size to truncate the file to.
        self._truncate_to: int | None = None

    @property
    def metrics_file(self) -> Path:
        """Where the metrics are written: ``log_dir/metrics.csv``."""
        return self._folder.path / METRICS_FILE

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` as a row at ``step``; see the class docstring for merging."""
        if not metrics:
            return
        if STEP_COLUMN in metrics:
            raise MisconfigurationError(
                f"A metric is named {STEP_COLUMN!r}, which is the CSV's own step column. "
                "Log it under another name, e.g. 'my_step'."
            )
        row = {name: _as_number(name, value) for name, value in metrics.items()}
        last = self._rows[-1] if self._rows else None
        if last is not None and last[STEP_COLUMN] == step and last.keys().isdisjoint(row):
            last.update(row)
        elif last is None and _merges(self._last_written, step, row):
            assert self._last_written is not None
            written, offset = self._last_written
            # Taken back from the file: the next write replaces it with the merged row.
            self._rows.append({**written, **row})
            self._truncate_to, self._last_written = offset, None
        else:
            self._rows.append({STEP_COLUMN: int(step), **row})
        if len(self._rows) >= self.flush_every:
            self.save()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Write ``params`` to ``hparams.yaml`` now (merged with those of earlier calls).

        Values YAML cannot hold are converted: one-element tensors to numbers, paths to
        str, other objects to their ``repr``.
        """
        self._hparams.update(params)
        write_hparams_yaml(self._folder.path, self._hparams)

    def save(self) -> None:
        """Write the buffered rows to ``metrics.csv`` (rewritten only when the header grows)."""
        if not self._rows:
            return
        path = self.metrics_file
        self._take_back_last_row()
        if self._columns is None:
            self._columns = _read_header(path)
        known = set(self._columns)
        new_columns: list[str] = []
        for row in self._rows:
            for column in row:
                if column not in known:
                    known.add(column)
                    new_columns.append(column)
        if new_columns or not path.exists():
            self._rewrite(path, self._columns + new_columns)
        else:
            file = self._open()
            file.write(_format(self._rows[:-1], self._columns))
            offset = file.seek(0, os.SEEK_END)
            file.write(_format(self._rows[-1:], self._columns))
            self._last_written = (self._rows[-1], offset)
        self._rows = []

    def finalize(self, status: str) -> None:
        """Write what is still buffered and close the file; ``status`` changes nothing written.

        A later ``log_metrics`` appends to the same file.
        """
        self.save()
        self._close()

    def continue_run(self, state: dict[str, Any], step: int) -> None:
        """Continue the checkpoint's version folder, without the rows of steps after ``step``.

        With ``version=None``, the logger takes the version in ``state`` (see
        ``checkpoint_state``), unless it already wrote to a folder of its own, which it then
        keeps (with a warning); a folder only picked, and still empty, is given up. A
        ``version`` given to the constructor always wins. Then ``metrics.csv`` is rewritten
        (atomically) without its rows of steps after ``step``, and buffered rows of such steps
        are dropped, so the steps the resumed fit logs again appear once, in order.
        """
        self._take_back_last_row()  # the buffer holds it: it must not stay on disk as well
        self._close()
        self._continue_version(state)
        self._rows = [row for row in self._rows if row[STEP_COLUMN] <= step]
        self._last_written = None
        path = self.metrics_file
        header = _read_header(path)
        # The header on disk: None makes the next write read it from the (new) folder.
        self._columns = None
        if STEP_COLUMN not in header:
            return
        column = header.index(STEP_COLUMN)
        with open_atomically(path) as file:
            writer = csv.writer(file)
            writer.writerow(header)
            with path.open(encoding="utf-8", newline="") as old_file:
                reader = csv.reader(old_file)
                next(reader, None)
                writer.writerows(row for row in reader if not _is_after(row, column, step))

    def _rewrite(self, path: Path, columns: list[str]) -> None:
        """Write ``columns`` as the header, the file's old rows padded, then the buffer."""
        self._close()
        old_width = len(self._columns or [])
        padding = [""] * (len(columns) - old_width)
        last_row = _format(self._rows[-1:], columns)
        with open_atomically(path) as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            if old_width and path.exists():
                # Stream the old rows: a long run's file need not fit in memory twice.
                with path.open(encoding="utf-8", newline="") as old_file:
                    reader = csv.reader(old_file)
                    next(reader, None)
                    for old_row in reader:
                        writer.writerow(old_row + padding)
            csv.DictWriter(file, fieldnames=columns, restval="").writerows(self._rows[:-1])
            file.write(last_row.decode("utf-8"))
        self._columns = columns
        self._last_written = (self._rows[-1], path.stat().st_size - len(last_row))

    def _take_back_last_row(self) -> None:
        """Cut the row that ``log_metrics`` took back into the buffer (to merge) off the file."""
        if self._truncate_to is not None:
            if self.metrics_file.exists():
                self._open().truncate(self._truncate_to)
            self._truncate_to = None

    def _open(self) -> BinaryIO:
        """``metrics.csv`` open for appending, unbuffered (opened on first need)."""
        if self._file is None:
            self._file = self.metrics_file.open("ab", buffering=0)
        return self._file

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _merges(written: tuple[dict[str, float], int] | None, step: int, row: dict[str, float]) -> bool:
    """Whether ``row`` of ``step`` merges into the last ``written`` row (same step, new names)."""
    return (
        written is not None
        and written[0][STEP_COLUMN] == step
        and written[0].keys().isdisjoint(row)
    )


def _format(rows: list[dict[str, float]], columns: list[str]) -> bytes:
    """``rows`` as CSV lines in the order of ``columns`` (empty cells for missing names)."""
    if not rows:
        return b""
    text = io.StringIO()
    csv.DictWriter(text, fieldnames=columns, restval="").writerows(rows)
    return text.getvalue().encode("utf-8")


def _read_header(path: Path) -> list[str]:
    """The first row of an existing CSV file, or [] when there is none."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as file:
        return next(csv.reader(file), [])


def _is_after(row: list[str], column: int, step: int) -> bool:
    """Whether ``row``'s step is after ``step``; a row without a readable step is kept."""
    try:
        return float(row[column]) > step
    except (IndexError, ValueError):
        return False


def _as_number(name: str, value: Any) -> float:
    """``value`` as a Python number; ints stay ints so that e.g. ``epoch`` reads as ``3``."""
    if type(value) in (int, float):
        return value
    try:
        if hasattr(value, "item"):
            value = value.item()  # a one-element tensor or a numpy scalar
        return value if isinstance(value, int) and not isinstance(value, bool) else float(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise MisconfigurationError(
            f"The metric {name!r} has the value {value!r} ({type(value).__name__}); loggers "
            "accept numbers and one-element tensors. Log a number instead."
        ) from error
