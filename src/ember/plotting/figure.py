"""Drawing curves: metrics grouped into panels, the training loss smoothed, saved to a file.

matplotlib is imported only when a figure is drawn, and only its object-oriented API is used
(``matplotlib.figure.Figure``, saved through the Agg canvas), so the user's pyplot backend and
open windows are left alone.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import MisconfigurationError
from ember.loggers._files import is_installed
from ember.plotting.runs import Curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The weight of the exponential moving average drawn over the training loss (TensorBoard's
#: default too, so both show the same line).
DEFAULT_SMOOTHING = 0.6
#: Inches of one panel (width, height) and the resolution: 2 panels a row -> 1280 px wide.
PANEL_SIZE = (6.4, 3.8)
DPI = 100
#: File types the picture can be saved as (by the file name's suffix).
FORMATS = (".png", ".svg", ".pdf")
#: A panel whose positive values span this ratio or more gets a log scale.
LOG_SCALE_RATIO = 50.0
#: Curves with at most this many points get a marker on each point.
MARKER_LIMIT = 50

TRAIN_LOSS = "train loss"
TRAIN_METRICS = "train metrics"
VALIDATION = "validation"
TEST = "test"
LEARNING_RATE = "learning rate"
OTHER = "other"
_FIRST_GROUPS = (TRAIN_LOSS, TRAIN_METRICS, VALIDATION, TEST, LEARNING_RATE)
#: Logged counters rather than curves.
_NOT_PLOTTED = frozenset({"epoch", "step", "global_step"})
_FIRST_WORD = re.compile(r"[/_\-.]")


@dataclass(frozen=True)
class Panel:
    """One panel of the picture: a group title and the names of its curves."""

    title: str
    names: tuple[str, ...]


def metric_group(name: str) -> str | None:
    """The panel a metric belongs in, or None for counters (``epoch``, ``step``).

    ``lr-*`` -> "learning rate"; a name starting with ``val``/``valid``/``validation`` ->
    "validation", with ``test`` -> "test"; with ``train`` or with no prefix, a loss ->
    "train loss" and anything else under ``train`` -> "train metrics"; another ``prefix/``
    -> its prefix (``throughput/samples_per_sec`` -> "throughput"); the rest -> "other".
    """
    lowered = name.lower()
    if lowered in _NOT_PLOTTED:
        return None
    if lowered.startswith("lr-") or lowered == "lr" or lowered.startswith("lr/"):
        return LEARNING_RATE
    first_word = _FIRST_WORD.split(lowered, maxsplit=1)[0]
    if first_word in ("val", "valid", "validation"):
        return VALIDATION
    if first_word == TEST:
        return TEST
    prefix, slash, _ = name.partition("/")
    if first_word == "train" or not slash:
        if "loss" in lowered:
            return TRAIN_LOSS
        return TRAIN_METRICS if first_word == "train" else OTHER
    return prefix


def group_curves(names: Sequence[str]) -> list[Panel]:
    """The panels for these metric names: train loss, train metrics, validation, test,
    learning rate, then the other prefixes alphabetically, then "other"; empty ones left out."""
    groups: dict[str, list[str]] = {}
    for name in names:
        group = metric_group(name)
        if group is not None:
            groups.setdefault(group, []).append(name)
    order = [*_FIRST_GROUPS, *sorted(set(groups) - {*_FIRST_GROUPS, OTHER}), OTHER]
    return [Panel(title, tuple(groups[title])) for title in order if title in groups]


def smooth(values: Sequence[float], weight: float = DEFAULT_SMOOTHING) -> list[float]:
    """The debiased exponential moving average of ``values``, as TensorBoard smooths.

    ``s_t = sum_k weight^(t-k) * (1 - weight) * v_k / (1 - weight^(t+1))`` over the finite
    values so far, so the first point is ``v_0`` rather than pulled toward zero. A value
    that is not finite stays as it is (a gap in the line) and leaves the average unchanged.
    """
    check_smoothing(weight)
    smoothed: list[float] = []
    average, count = 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        average = weight * average + (1.0 - weight) * value
        count += 1
        smoothed.append(average / (1.0 - weight**count) if weight else value)
    return smoothed


def plot_curves(
    curves: Mapping[str, Curve], title: str | None = None, smoothing: float = DEFAULT_SMOOTHING
) -> Figure:
    """A figure with one panel per metric group (see ``metric_group``), against the step.

    The training loss is drawn faintly with its moving average (``smooth``, weight
    ``smoothing``; 0 draws it once, unsmoothed) in full colour on top. Panels are laid out two
    a row, each ``PANEL_SIZE`` inches at ``DPI``, and share the step range; a panel whose
    values span ``LOG_SCALE_RATIO`` or more gets a log scale.

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message names the install.
        MisconfigurationError: ``smoothing`` is not in [0, 1), or no curve has a value.
    """
    check_smoothing(smoothing)
    require_matplotlib("Plotting curves")
    from matplotlib.figure import Figure

    panels = group_curves([name for name, curve in curves.items() if curve.steps])
    if not panels:
        raise MisconfigurationError(
            f"There is nothing to plot: the metrics {sorted(curves)} hold no values "
            "(only counters such as 'epoch' are skipped). Log at least one metric."
        )
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure = Figure(
        figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained"
    )
    grid = figure.subplots(rows, columns, squeeze=False)
    all_axes = [axes for row in grid for axes in row]
    steps = [step for curve in curves.values() for step in curve.steps]
    for axes, panel in zip(all_axes[: len(panels)], panels, strict=True):
        _draw_panel(axes, panel, curves, smoothing)
        if min(steps) < max(steps):  # a small margin keeps the end markers whole
            margin = 0.02 * (max(steps) - min(steps))
            axes.set_xlim(min(steps) - margin, max(steps) + margin)
    for unused in all_axes[len(panels) :]:
        figure.delaxes(unused)
    if title:
        figure.suptitle(title)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` to ``path`` (PNG, SVG or PDF by its suffix), replacing it atomically,
    so an image viewer never shows a half-written file; the folder is created if needed."""
    target = Path(path)
    file_format = check_image_path(target, "path")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the umask's usual permissions.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("xb") as file:
            figure.savefig(file, format=file_format, dpi=figure.dpi)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def check_image_path(path: str | os.PathLike[str], argument: str) -> str:
    """The format ("png", "svg" or "pdf") of the file name ``path``, else an error naming
    ``argument``."""
    suffix = Path(path).suffix.lower()
    if not str(path) or suffix not in FORMATS:
        raise MisconfigurationError(
            f"`{argument}={str(path)!r}` is not supported. Accepted values: a file name ending "
            f"in {', '.join(FORMATS)}, e.g. 'curves.png'."
        )
    return suffix[1:]


def require_matplotlib(user: str) -> None:
    """Raise ``ModuleNotFoundError`` naming the ``plot`` extra when matplotlib is missing."""
    if not is_installed("matplotlib"):
        raise ModuleNotFoundError(
            f"{user} needs the `matplotlib` package, which is not installed. Install it with "
            '`pip install "ember[plot]"` (or `pip install matplotlib`).',
            name="matplotlib",
        )


def check_smoothing(weight: float) -> None:
    """Raise ``MisconfigurationError`` unless ``weight`` is a number in [0, 1)."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < 1:
        raise MisconfigurationError(
            f"`smoothing={weight!r}` is not supported. Accepted values: a number in [0, 1): "
            "the weight of the moving average over the training loss (0: no smoothing)."
        )


def _draw_panel(axes: Axes, panel: Panel, curves: Mapping[str, Curve], smoothing: float) -> None:
    smoothed = panel.title == TRAIN_LOSS and smoothing > 0
    values: list[float] = []
    for index, name in enumerate(panel.names):
        curve = curves[name]
        values.extend(curve.values)
        color = f"C{index}"
        marker = "o" if len(curve.steps) <= MARKER_LIMIT else None
        # An epoch-level value (one point per epoch) is already an average: drawn as it is.
        if smoothed and not name.endswith("_epoch") and len(curve.steps) > 1:
            axes.plot(curve.steps, curve.values, color=color, alpha=0.3, linewidth=1, label=name)
            axes.plot(
                curve.steps,
                smooth(curve.values, smoothing),
                color=color,
                linewidth=2,
                label=f"{name} (smoothed, EMA {smoothing:g})",
            )
        else:
            axes.plot(
                curve.steps, curve.values, color=color, marker=marker, markersize=3, label=name
            )
    log_scale = _spans_decades(values)
    if log_scale:
        axes.set_yscale("log")
    axes.set_title(panel.title + (" (log scale)" if log_scale else ""))
    axes.set_xlabel("step")
    axes.set_ylabel(panel.names[0] if len(panel.names) == 1 else _y_label(panel.title))
    axes.grid(True, which="major", alpha=0.4)
    axes.legend(fontsize="small")


def _y_label(title: str) -> str:
    return {TRAIN_LOSS: "loss", LEARNING_RATE: "learning rate"}.get(title, "value")


def _spans_decades(values: list[float]) -> bool:
    finite = [value for value in values if math.isfinite(value)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) >= LOG_SCALE_RATIO
