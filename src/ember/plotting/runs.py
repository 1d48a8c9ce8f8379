"""Finding a run's folder and reading its curves from ``metrics.csv`` or TensorBoard events.

Needs nothing beyond the standard library for ``metrics.csv``; reading event files needs the
``tensorboard`` package, imported only then.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ember.errors import MisconfigurationError
from ember.loggers._files import is_installed
from ember.loggers.csv import METRICS_FILE, STEP_COLUMN

#: What every TensorBoard event file's name holds (``events.out.tfevents.<time>.<host>...``).
EVENT_FILE_MARK = "tfevents"
_VERSION = re.compile(r"version_(\d+)$")
_LOOKED_FOR = (
    f"a run folder holding {METRICS_FILE} (CSVLogger) or TensorBoard event files "
    "(events.out.tfevents.*), or a folder with such run folders one or two levels below it "
    "(e.g. logs/ember or the Trainer's default_root_dir)"
)


class RunNotFoundError(FileNotFoundError):
    """The path given holds no run: no ``metrics.csv`` and no event files where looked."""


@dataclass(frozen=True)
class Curve:
    """One metric's values against the step, in step order."""

    name: str
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class Run:
    """A run's folder and where its metrics are read from.

    Attributes:
        folder: the version folder (e.g. ``logs/ember/version_3``).
        source: ``folder/metrics.csv``, or ``folder`` itself for TensorBoard event files.
        kind: ``"csv"`` or ``"tensorboard"``.
        candidates: every run folder found under the path given, oldest first (``folder``
            is the last); just ``(folder,)`` when the path was a run folder itself.
    """

    folder: Path
    source: Path
    kind: str
    candidates: tuple[Path, ...]


def find_run(path: str | os.PathLike[str]) -> Run:
    """The run at ``path``: that folder if it holds one, else the newest run below it.

    ``path`` may be a version folder (``logs/ember/version_0``), a folder of versions
    (``logs/ember``: the newest is taken), or a root folder with ``<name>/version_N`` below
    it (the Trainer's ``default_root_dir``). Newest means the run whose ``metrics.csv`` or
    event file was written last; the version number breaks ties. A folder holding both
    ``metrics.csv`` and event files is read from ``metrics.csv``.

    Raises:
        RunNotFoundError: ``path`` does not exist or no run is found; the message names the
            path and what was looked for.
    """
    given = Path(path)
    if not given.exists():
        raise RunNotFoundError(f"{str(given)!r} does not exist. Expected {_LOOKED_FOR}.")
    if given.is_file():
        if given.name != METRICS_FILE and EVENT_FILE_MARK not in given.name:
            raise RunNotFoundError(f"{str(given)!r} is a file, not a run. Expected {_LOOKED_FOR}.")
        given = given.parent
    found = _run_in(given)
    if found is not None:
        return Run(given, found[1], found[0], (given,))
    runs = {child: run for child in _folders_below(given) if (run := _run_in(child)) is not None}
    if not runs:
        raise RunNotFoundError(f"{str(given)!r} holds no run. Expected {_LOOKED_FOR}.")
    oldest_first = sorted(runs, key=_age_key)
    newest = oldest_first[-1]
    kind, source = runs[newest]
    return Run(newest, source, kind, tuple(oldest_first))


def read_run(run: Run) -> dict[str, Curve]:
    """Every metric of ``run`` as a ``Curve``, by name."""
    if run.kind == "csv":
        return read_csv_metrics(run.source)
    return read_tensorboard_metrics(run.source)


def read_csv_metrics(path: str | os.PathLike[str]) -> dict[str, Curve]:
    """The curves in a ``metrics.csv`` written by ``CSVLogger``: one per column but ``step``.

    Empty cells (a metric not logged at that row's step) and cells that are not numbers are
    skipped; ``nan`` and ``inf`` are kept (the plot shows them as gaps).

    Raises:
        MisconfigurationError: the file has no ``step`` column.
    """
    points: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(encoding="utf-8", newline="") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        if STEP_COLUMN not in header:
            raise MisconfigurationError(
                f"{str(path)!r} has no {STEP_COLUMN!r} column (its header is {header}): it is "
                "not a metrics.csv written by ember's CSVLogger."
            )
        step_column = header.index(STEP_COLUMN)
        for row in reader:
            step = _number(row[step_column]) if step_column < len(row) else None
            if step is None or not math.isfinite(step):
                continue
            for column, cell in enumerate(row[: len(header)]):
                value = _number(cell) if column != step_column else None
                if value is not None:
                    points.setdefault(header[column], []).append((int(step), value))
    return {name: _curve(name, pairs) for name, pairs in points.items()}


def read_tensorboard_metrics(folder: str | os.PathLike[str]) -> dict[str, Curve]:
    """The scalars in the TensorBoard event files of ``folder``, by tag.

    Read with TensorBoard's ``EventAccumulator``, every value kept, so events hidden by a
    resumed run's ``purge_step`` are left out as TensorBoard leaves them out.

    Raises:
        ModuleNotFoundError: ``tensorboard`` is not installed; the message names the install.
    """
    if not is_installed("tensorboard"):
        raise ModuleNotFoundError(
            f"Reading the TensorBoard event files in {str(folder)!r} needs the `tensorboard` "
            'package, which is not installed. Install it with `pip install "ember[tensorboard]"` '
            "(or `pip install tensorboard`), or log with ember.loggers.CSVLogger, whose "
            "metrics.csv needs nothing extra.",
            name="tensorboard",
        )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep all
    accumulator.Reload()
    curves: dict[str, Curve] = {}
    for tag in accumulator.Tags()["scalars"]:
        pairs = [(int(event.step), float(event.value)) for event in accumulator.Scalars(tag)]
        curves[tag] = _curve(tag, pairs)
    return curves


def _curve(name: str, pairs: list[tuple[int, float]]) -> Curve:
    pairs.sort(key=lambda pair: pair[0])  # stable: values of one step keep their order
    return Curve(name, [step for step, _ in pairs], [value for _, value in pairs])


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _run_in(folder: Path) -> tuple[str, Path] | None:
    """``("csv", metrics.csv)`` or ``("tensorboard", folder)`` when ``folder`` holds a run."""
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        return "csv", metrics
    if any(_event_files(folder)):
        return "tensorboard", folder
    return None


def _event_files(folder: Path) -> list[Path]:
    try:
        return [
            path for path in folder.iterdir() if EVENT_FILE_MARK in path.name and path.is_file()
        ]
    except OSError:  # unreadable: not a run
        return []


def _folders_below(folder: Path) -> list[Path]:
    """Folders one and two levels below ``folder``, hidden ones (``.tmp-*``) left out."""
    found: list[Path] = []
    for child in _subfolders(folder):
        found.append(child)
        found.extend(_subfolders(child))
    return found


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(
            path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")
        )
    except OSError:
        return []


def _age_key(folder: Path) -> tuple[float, int, str]:
    """Sorts runs oldest first: by the last write of their metrics, then version number."""
    metrics = folder / METRICS_FILE
    files = [metrics] if metrics.is_file() else _event_files(folder)
    written = max(path.stat().st_mtime for path in files)
    version = _VERSION.match(folder.name)
    return written, int(version.group(1)) if version else -1, str(folder)
