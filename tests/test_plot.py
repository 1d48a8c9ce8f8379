"""``ember plot`` and ``PlotCurves``: real runs read back, drawn, and checked panel by panel."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import ember
from ember import MisconfigurationError, Trainer
from ember.callbacks import LearningRateMonitor, PlotCurves, ThroughputMonitor
from ember.cli import main
from ember.loggers import CSVLogger, TensorBoardLogger
from ember.plotting import (
    DEFAULT_SMOOTHING,
    RunNotFoundError,
    find_run,
    metric_group,
    plot_curves,
    plot_run,
    read_csv_metrics,
    smooth,
)
from tests.helpers import MemoryLogger, TinyModule, loader

SOURCE = Path(ember.__file__).resolve().parents[1]
PLOT_EXTRA = 'pip install "ember[plot]"'


def fit(
    root: Path, loggers: list[Any], callbacks: list[Any] | None = None, **kwargs: Any
) -> Trainer:
    """Two epochs of the tiny regression (8 steps each), logging every 2 steps."""
    trainer = Trainer(
        **{"max_epochs": 2, **kwargs},
        logger=loggers,
        callbacks=callbacks or [],
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(TinyModule(), loader(), loader())
    return trainer


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def lines_by_label(axes: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in axes.get_lines()}


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MemoryLogger]:
    """A fit with a CSVLogger (under root/ember/version_0) and a logger that keeps the values."""
    root = tmp_path_factory.mktemp("csv_run")
    memory = MemoryLogger()
    fit(root, [CSVLogger(root), memory], [LearningRateMonitor(), ThroughputMonitor()])
    return root, memory


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MemoryLogger]:
    root = tmp_path_factory.mktemp("tensorboard_run")
    memory = MemoryLogger()
    fit(root, [TensorBoardLogger(root), memory])
    return root / "ember" / "version_0", memory


# --- reading and drawing a real run ----------------------------------------------------------


def test_cli_plots_a_csv_run_one_panel_per_group(
    csv_run: tuple[Path, MemoryLogger], capsys: pytest.CaptureFixture[str]
) -> None:
    root, memory = csv_run
    out = root / "picture.png"
    assert main(["plot", str(root), "--out", str(out)]) == 0  # a root_dir: ember/version_0 below
    assert str(out) in capsys.readouterr().out

    result = plot_run(root, root / "again.png")
    assert result.run.folder == root / "ember" / "version_0"
    titles = [axes.get_title().removesuffix(" (log scale)") for axes in result.figure.axes]
    assert titles == ["train loss", "validation", "learning rate", "throughput"]
    width, height = result.figure.get_size_inches() * result.figure.dpi
    assert png_size(out) == (round(width), round(height)) == (1280, 760)  # 2 x 2 panels

    train, validation, learning_rate, throughput = result.figure.axes
    for axes, name in [
        (validation, "val_loss"),
        (learning_rate, "lr-SGD"),
        (throughput, "throughput/samples_per_sec"),
        (train, "train_loss"),
    ]:
        line = lines_by_label(axes)[name]
        logged = memory.values(name)
        assert list(line.get_xdata()) == [step for step, _ in logged]
        assert list(line.get_ydata()) == pytest.approx([value for _, value in logged])
        assert axes.get_xlabel() == "step"
        assert axes.get_legend() is not None
    smoothed = lines_by_label(train)[f"train_loss (smoothed, EMA {DEFAULT_SMOOTHING:g})"]
    raw = [value for _, value in memory.values("train_loss")]
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(raw, DEFAULT_SMOOTHING))


def test_cli_plots_a_tensorboard_only_run(
    tensorboard_run: tuple[Path, MemoryLogger], capsys: pytest.CaptureFixture[str]
) -> None:
    version, memory = tensorboard_run
    assert main(["plot", str(version)]) == 0
    out = version / "curves.png"  # the default --out
    assert str(out) in capsys.readouterr().out

    result = plot_run(version, version / "again.png")
    assert result.run.kind == "tensorboard"
    assert [axes.get_title() for axes in result.figure.axes] == ["train loss", "validation"]
    assert png_size(out) == (1280, 380)  # 2 panels in one row
    validation = lines_by_label(result.figure.axes[1])["val_loss"]
    logged = memory.values("val_loss")
    assert list(validation.get_xdata()) == [step for step, _ in logged]
    # Event files hold float32.
    assert list(validation.get_ydata()) == pytest.approx([v for _, v in logged], rel=1e-6)


def test_newest_run_is_taken_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for version, loss in [(0, "1.0"), (1, "2.0"), (2, "3.0")]:
        folder = tmp_path / "logs" / "ember" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(f"step,train_loss\n1,{loss}\n2,{loss}\n")
    # version_1 was written last (e.g. a resumed older run): it is the newest.
    for version, seconds in [(0, 100), (1, 300), (2, 200)]:
        metrics = tmp_path / "logs" / "ember" / f"version_{version}" / "metrics.csv"
        os.utime(metrics, (seconds, seconds))

    assert main(["plot", str(tmp_path / "logs" / "ember")]) == 0
    newest = tmp_path / "logs" / "ember" / "version_1"
    assert f"3 runs under {tmp_path / 'logs' / 'ember'}: plotting the newest, {newest}" in (
        capsys.readouterr().out
    )
    assert (newest / "curves.png").is_file()
    assert not (tmp_path / "logs" / "ember" / "version_2" / "curves.png").exists()
    assert find_run(tmp_path / "logs").folder == newest  # two levels down too


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "missing", "other files"])
def test_a_folder_without_a_run_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    folder = tmp_path / "nothing_here"
    if kind != "missing":
        (folder / "checkpoints" / "last").mkdir(parents=True)
    if kind == "other files":
        (folder / "checkpoints" / "last" / "model.safetensors").write_bytes(b"")
    assert main(["plot", str(folder)]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert error.startswith("ember plot: error:")
    assert str(folder) in error
    assert "metrics.csv" in error and "events.out.tfevents" in error
    with pytest.raises(RunNotFoundError, match="nothing_here"):
        find_run(folder)


def test_bad_out_and_smoothing_are_usage_errors(
    csv_run: tuple[Path, MemoryLogger], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = csv_run
    assert main(["plot", str(root), "--out", "curves.txt"]) == 2
    assert "`--out='curves.txt'`" in capsys.readouterr().err
    assert main(["plot", str(root), "--smoothing", "1.5"]) == 2
    assert "`smoothing=1.5`" in capsys.readouterr().err
    with pytest.raises(MisconfigurationError, match="`filename='curves.jpeg'`"):
        PlotCurves(filename="curves.jpeg")
    with pytest.raises(MisconfigurationError, match="smoothing=-0.1"):
        PlotCurves(smoothing=-0.1)


def test_missing_matplotlib_names_the_extra(
    csv_run: tuple[Path, MemoryLogger],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _ = csv_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["plot", str(root), "--out", str(root / "never.png")]) == 1
    error = capsys.readouterr().err
    assert PLOT_EXTRA in error and "matplotlib" in error
    assert not (root / "never.png").exists()
    with pytest.raises(ModuleNotFoundError, match=r"PlotCurves needs the `matplotlib`") as caught:
        PlotCurves()
    assert PLOT_EXTRA in str(caught.value)


def test_import_ember_does_not_import_matplotlib() -> None:
    check = (
        "import sys, ember, ember.callbacks, ember.plotting, ember.cli; "
        "from ember.callbacks import PlotCurves; PlotCurves(); "
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    environment = {**os.environ, "PYTHONPATH": str(SOURCE)}
    result = subprocess.run(
        [sys.executable, "-c", check], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout


# --- the pieces ------------------------------------------------------------------------------


def test_smoothing_matches_a_hand_computation() -> None:
    # Debiased EMA, weight 0.5: s0 = 1; s1 = (0.5*1 + 3) / 1.5; s2 = (0.25*1 + 0.5*3 + 2) / 1.75.
    assert smooth([1.0, 3.0, 2.0], 0.5) == pytest.approx([1.0, 3.5 / 1.5, 3.75 / 1.75])
    # A gap stays a gap and leaves the average as it was.
    gapped = smooth([1.0, math.nan, 3.0], 0.5)
    assert math.isnan(gapped[1])
    assert gapped[2] == pytest.approx(3.5 / 1.5)
    assert smooth([4.0, 2.0], 0.0) == [4.0, 2.0]


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("train_loss", "train loss"),
        ("loss", "train loss"),
        ("train/loss_step", "train loss"),
        ("train_acc", "train metrics"),
        ("val_loss", "validation"),
        ("val/acc", "validation"),
        ("validation_ppl", "validation"),
        ("test_loss", "test"),
        ("lr-AdamW", "learning rate"),
        ("lr-AdamW/pg1", "learning rate"),
        ("throughput/samples_per_sec", "throughput"),
        ("profiler/forward_ms", "profiler"),
        ("grad_norm", "other"),
        ("epoch", None),
    ],
)
def test_metric_groups(name: str, group: str | None) -> None:
    assert metric_group(name) == group


def test_csv_gaps_epoch_column_and_log_scale(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "step,train_loss,epoch,val_acc\n"
        "1,100.0,0,\n"
        "2,10.0,0,\n"
        "3,1.0,0,0.5\n"
        "4,0.1,1,\n"
        "5,0.05,1,0.75\n"
    )
    curves = read_csv_metrics(path)
    assert curves["val_acc"].steps == [3, 5] and curves["val_acc"].values == [0.5, 0.75]
    figure = plot_curves(curves)  # epoch is a counter, not a panel
    assert [axes.get_title() for axes in figure.axes] == ["train loss (log scale)", "validation"]
    assert figure.axes[0].get_yscale() == "log" and figure.axes[1].get_yscale() == "linear"

    (tmp_path / "bad.csv").write_text("time,loss\n1,2\n")
    with pytest.raises(MisconfigurationError, match="no 'step' column"):
        read_csv_metrics(tmp_path / "bad.csv")


# --- the callback ----------------------------------------------------------------------------


def test_plot_curves_writes_at_fit_end_with_every_logged_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ember.callbacks.plot_curves as plot_curves_module

    drawn: list[dict[str, Any]] = []

    def recording_plot_curves(curves: Any, **kwargs: Any) -> Any:
        drawn.append(dict(curves))
        return plot_curves(curves, **kwargs)

    monkeypatch.setattr(plot_curves_module, "plot_curves", recording_plot_curves)
    memory = MemoryLogger()
    callback = PlotCurves()
    # Rows stay buffered (flush_every=1000) and the fit stops mid-epoch, after the last
    # epoch-end save: the picture must still hold the last step's row.
    logger = CSVLogger(tmp_path, flush_every=1000)
    trainer = fit(tmp_path, [logger, memory], [callback], max_steps=11)

    assert callback.path == Path(trainer.log_dir) / "curves.png"
    assert png_size(callback.path) == (1280, 380)
    umask = os.umask(0)
    os.umask(umask)
    assert callback.path.stat().st_mode & 0o777 == 0o666 & ~umask  # not a private temp file
    assert [path.name for path in callback.path.parent.iterdir() if path.name.startswith(".")] == []
    (curves,) = drawn
    assert curves["train_loss"].steps == [step for step, _ in memory.values("train_loss")]
    assert curves["train_loss"].steps[-1] == 10
    assert curves["val_loss"].steps == [step for step, _ in memory.values("val_loss")]


def test_plot_curves_reads_tensorboard_and_takes_an_absolute_filename(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "run.svg"
    callback = PlotCurves(filename=target)
    fit(tmp_path, [TensorBoardLogger(tmp_path)], [callback])
    assert callback.path == target
    assert target.read_text().lstrip().startswith("<?xml")


def test_plot_curves_without_a_readable_logger_warns_once(tmp_path: Path) -> None:
    callback = PlotCurves()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [MemoryLogger()], [callback])
    messages = [str(warning.message) for warning in caught if "PlotCurves" in str(warning.message)]
    assert len(messages) == 1
    assert "MemoryLogger" in messages[0] and "CSVLogger" in messages[0]
    assert callback.path is None
    assert not list(tmp_path.rglob("*.png"))
