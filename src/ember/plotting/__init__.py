"""A run's curves as a picture: what ``ember plot`` and ``PlotCurves`` draw.

``runs`` finds a run's folder and reads its metrics (``metrics.csv`` or TensorBoard event
files); ``figure`` groups them into panels and draws them with matplotlib (the ``plot``
extra, imported only when drawing, so ``import ember`` never imports it).

Examples:
    ```python
    from ember.plotting import plot_run

    result = plot_run("runs/char_transformer")  # the newest run below it
    print(result.path)  # runs/char_transformer/ember_logs/version_0/curves.png
    ```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.plotting.figure import (
    DEFAULT_SMOOTHING,
    Panel,
    check_image_path,
    check_smoothing,
    group_curves,
    metric_group,
    plot_curves,
    require_matplotlib,
    save_figure,
    smooth,
)
from ember.plotting.runs import (
    Curve,
    Run,
    RunNotFoundError,
    find_run,
    read_csv_metrics,
    read_run,
    read_tensorboard_metrics,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The file ``ember plot`` writes into the run folder when no ``--out`` is given.
DEFAULT_FILENAME = "curves.png"

__all__ = [
    "DEFAULT_FILENAME",
    "DEFAULT_SMOOTHING",
    "Curve",
    "Panel",
    "PlotResult",
    "Run",
    "RunNotFoundError",
    "check_image_path",
    "check_smoothing",
    "find_run",
    "group_curves",
    "metric_group",
    "plot_curves",
    "plot_run",
    "read_csv_metrics",
    "read_run",
    "read_tensorboard_metrics",
    "require_matplotlib",
    "run_title",
    "save_figure",
    "smooth",
]


@dataclass(frozen=True)
class PlotResult:
    """What ``plot_run`` drew: the run, the figure (its axes are the panels) and the file."""

    run: Run
    figure: Figure
    path: Path


def plot_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
) -> PlotResult:
    """Draw the curves of the run at ``run_dir`` (see ``find_run``) and save them to ``out``.

    Args:
        run_dir: a run folder, or a folder with runs below it (the newest is taken).
        out: the image to write (``.png``, ``.svg`` or ``.pdf``); default
            ``<run folder>/curves.png``.
        smoothing: the weight of the moving average over the training loss, in [0, 1).

    Raises:
        RunNotFoundError: no run at or below ``run_dir``.
        ModuleNotFoundError: matplotlib (or, for event files, tensorboard) is missing.
        MisconfigurationError: a bad ``out`` or ``smoothing``, or a run with no values.
    """
    if out is not None:
        check_image_path(out, "out")
    require_matplotlib("ember plot")
    run = find_run(run_dir)
    figure = plot_curves(read_run(run), title=run_title(run), smoothing=smoothing)
    path = save_figure(figure, run.folder / DEFAULT_FILENAME if out is None else Path(out))
    return PlotResult(run, figure, path)


def run_title(run: Run) -> str:
    """The figure's title: the run folder's last two parts and the file read."""
    name = "/".join(run.folder.resolve().parts[-2:])
    source = run.source.name if run.kind == "csv" else "TensorBoard events"
    return f"{name} ({source})"
