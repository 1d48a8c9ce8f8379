"""``PlotCurves``: a picture of the run's curves in the log folder at the end of fit."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ember.hooks import Callback
from ember.loggers.csv import CSVLogger
from ember.loggers.tensorboard import TensorBoardLogger
from ember.plotting import (
    DEFAULT_FILENAME,
    DEFAULT_SMOOTHING,
    Run,
    check_image_path,
    check_smoothing,
    group_curves,
    plot_curves,
    read_run,
    require_matplotlib,
    run_title,
    save_figure,
)

if TYPE_CHECKING:
    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer


class PlotCurves(Callback):
    """At the end of fit, draws the run's curves into ``trainer.log_dir / filename``.

    The picture is the one ``ember plot`` draws (docs/plotting.md): one panel per metric
    group against the step, the training loss with its moving average. The values are read
    back from what the run wrote: the ``metrics.csv`` of the Trainer's first ``CSVLogger``
    (saved first, so every buffered row is in), else the event files of its first
    ``TensorBoardLogger`` (flushed first). A Trainer with neither (no logger, or only
    ``WandbLogger``) has no history to draw: the callback warns once, at fit start, and draws
    nothing. Only the global-zero process draws; under ``fast_dev_run`` nothing is drawn.

    Args:
        filename: the image's name (``.png``, ``.svg`` or ``.pdf``); a relative one is taken
            inside ``trainer.log_dir``, an absolute one as it is.
        smoothing: the weight of the moving average over the training loss, in [0, 1).

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install "ember[plot]"``),
            raised when the callback is created, before any training.
        MisconfigurationError: a bad ``filename`` or ``smoothing``.

    Examples:
        >>> from ember import Trainer
        >>> from ember.callbacks import PlotCurves
        >>> trainer = Trainer(max_epochs=1, callbacks=[PlotCurves()])  # curves.png after fit
    """

    def __init__(
        self,
        filename: str | os.PathLike[str] = DEFAULT_FILENAME,
        smoothing: float = DEFAULT_SMOOTHING,
    ) -> None:
        check_image_path(filename, "filename")
        check_smoothing(smoothing)
        require_matplotlib("PlotCurves")
        self.filename = Path(filename)
        self.smoothing = smoothing
        #: The image written at the end of the last fit, or None.
        self.path: Path | None = None
        self._warned = False

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run and _source(trainer) is None:
            self._warn_no_source(trainer)

    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        logger = _source(trainer)
        if logger is None:
            self._warn_no_source(trainer)
            return
        logger.save()  # buffered CSV rows, pending events: on disk before reading them back
        if isinstance(logger, CSVLogger):
            run = Run(Path(logger.log_dir), logger.metrics_file, "csv", ())
        else:
            run = Run(Path(logger.log_dir), Path(logger.log_dir), "tensorboard", ())
        curves = read_run(run)
        if not group_curves([name for name, curve in curves.items() if curve.steps]):
            return  # nothing was logged (e.g. no training batch): no picture to draw
        figure = plot_curves(curves, title=run_title(run), smoothing=self.smoothing)
        self.path = save_figure(figure, Path(trainer.log_dir) / self.filename)

    def _warn_no_source(self, trainer: Trainer) -> None:
        if self._warned:
            return
        self._warned = True
        names = [type(logger).__name__ for logger in trainer.loggers] or ["no logger"]
        warnings.warn(
            f"PlotCurves reads the curves back from a CSVLogger's metrics.csv or a "
            f"TensorBoardLogger's event files, but the Trainer has {', '.join(names)}: no "
            "picture will be drawn. Add `ember.loggers.CSVLogger(...)` to the Trainer's "
            "`logger` list.",
            UserWarning,
            stacklevel=2,
        )


def _source(trainer: Trainer) -> CSVLogger | TensorBoardLogger | None:
    """The logger to read the curves from: the first CSVLogger, else the first
    TensorBoardLogger, else None."""
    csv_logger = next((log for log in trainer.loggers if isinstance(log, CSVLogger)), None)
    if csv_logger is not None:
        return csv_logger
    return next((log for log in trainer.loggers if isinstance(log, TensorBoardLogger)), None)
