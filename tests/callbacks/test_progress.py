"""ProgressBar: bars in a terminal or notebook, one line per epoch elsewhere; what it shows,
and that it reads values only when it draws."""

from __future__ import annotations

import io
import re
import sys
import types
from typing import Any

import pytest
import torch

from ember import MisconfigurationError, Trainer
from ember.callbacks import ProgressBar
from ember.callbacks.progress import in_notebook
from tests.helpers import TinyModule, loader


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class ShowsMetric(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("shown_metric", 0.5, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("val_shown", 1.25, prog_bar=True)


def _fit(stream: io.StringIO, epochs: int = 3, **kwargs: Any) -> Trainer:
    trainer = Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        callbacks=[ProgressBar(stream=stream, **kwargs)],
        num_sanity_val_steps=0,
    )
    trainer.fit(ShowsMetric(), loader(32, batch_size=8), loader(16, batch_size=8))
    return trainer


def test_not_a_terminal_prints_one_line_per_epoch() -> None:
    stream = io.StringIO()
    _fit(stream)
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 3
    for number, line in enumerate(lines, start=1):
        assert line.startswith(f"Epoch {number}/3: 4 batches")
        assert "loss=" in line and "shown_metric=0.5" in line and "val_shown=1.25" in line
    assert "\r" not in stream.getvalue()


def test_terminal_draws_bars_with_loss_and_metrics() -> None:
    stream = FakeTerminal()
    _fit(stream, epochs=2)
    output = stream.getvalue()
    assert "\r" in output  # redrawn in place
    assert "Epoch 1/2" in output and "Epoch 2/2" in output
    assert "4/4" in output
    assert "loss=" in output and "shown_metric=0.5" in output


def test_refresh_rate_zero_prints_nothing() -> None:
    stream = io.StringIO()
    _fit(stream, refresh_rate=0)
    assert stream.getvalue() == ""


def test_validate_and_test_print_their_results() -> None:
    stream = io.StringIO()
    trainer = Trainer(logger=False, callbacks=[ProgressBar(stream=stream)])
    trainer.validate(TinyModule(), loader(16))
    trainer.test(TinyModule(), loader(16))
    lines = stream.getvalue().strip().splitlines()
    assert lines[0].startswith("Validation: val_loss=")
    assert lines[1].startswith("Test: test_loss=")


def test_progress_bar_is_on_by_default() -> None:
    assert isinstance(Trainer(logger=False).progress_bar_callback, ProgressBar)
    assert Trainer(logger=False, enable_progress_bar=False).progress_bar_callback is None


def test_progress_bar_arguments_are_checked() -> None:
    with pytest.raises(MisconfigurationError, match="refresh_rate=-1"):
        ProgressBar(refresh_rate=-1)
    with pytest.raises(MisconfigurationError, match="enable_progress_bar=False"):
        Trainer(enable_progress_bar=False, callbacks=[ProgressBar()])


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    Trainer(max_epochs=1, logger=False).fit(TinyModule(), loader(16))
    assert "Epoch 1/1: 2 batches" in capsys.readouterr().out


# --- what the bar shows --------------------------------------------------------------------------


class LogsItsLoss(TinyModule):
    """Logs its loss with prog_bar=True, as most modules do."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss


def _names_shown(text: str) -> list[str]:
    return re.findall(r"(?:^|, )([\w/]+)=", text)


def _lines_of(module: TinyModule, **kwargs: Any) -> list[str]:
    stream = io.StringIO()
    options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    Trainer(callbacks=[ProgressBar(stream=stream)], **{**options, **kwargs}).fit(
        module, loader(32, batch_size=8)
    )
    return stream.getvalue().strip().splitlines()


def test_each_value_is_shown_once() -> None:
    (line,) = _lines_of(LogsItsLoss(), max_epochs=1)
    # The module shows its loss itself: no automatic `loss` beside it.
    assert _names_shown(line) == ["train_loss"]
    # A module that shows nothing gets the loss training_step returned.
    (line,) = _lines_of(TinyModule(), max_epochs=1)
    assert _names_shown(line) == ["loss"]
    # Another value beside the loss: both.
    (line,) = _lines_of(ShowsMetric(), max_epochs=1, num_sanity_val_steps=0)
    assert _names_shown(line) == ["loss", "shown_metric"]


def test_line_reports_steps_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = types.SimpleNamespace(now=50.0)
    monkeypatch.setattr(
        "ember.callbacks.progress.time", types.SimpleNamespace(perf_counter=lambda: clock.now)
    )

    class Slow(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            clock.now += 0.25
            return super().training_step(batch, batch_idx)

    (line,) = _lines_of(Slow(), max_epochs=1, accumulate_grad_batches=2)
    # 4 batches in 1 s are 2 optimizer steps: 2.0 steps/s.
    assert line.startswith("Epoch 1/1: 4 batches in 1.0s (2.0 steps/s), loss=")


class ValidatesStep(LogsItsLoss):
    """Validation logs the global step it ran at."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_step", float(self.global_step), prog_bar=True)


@pytest.mark.parametrize("terminal", [False, True])
def test_max_steps_last_line_shows_that_epochs_values(terminal: bool) -> None:
    stream = FakeTerminal() if terminal else io.StringIO()
    options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    trainer = Trainer(max_steps=6, callbacks=[ProgressBar(stream=stream)], **options)
    trainer.fit(ValidatesStep(), loader(32, batch_size=8), loader(16, batch_size=8))
    # Epoch 1 validates at step 4; epoch 2 stops at step 6 without validating: its line
    # shows its own training loss, not epoch 1's validation.
    first, last = _final_lines(stream.getvalue())
    assert "val_step=4" in first
    assert "val_step" not in last
    assert f"train_loss={trainer.callback_metrics['train_loss']:.4g}" in last
    # When a validation did run in that epoch (every 2 batches), its value shows.
    stream = FakeTerminal() if terminal else io.StringIO()
    trainer = Trainer(
        max_steps=6, val_check_interval=2, callbacks=[ProgressBar(stream=stream)], **options
    )
    trainer.fit(ValidatesStep(), loader(32, batch_size=8), loader(16, batch_size=8))
    assert "val_step=6" in _final_lines(stream.getvalue())[-1]


def _final_lines(output: str) -> list[str]:
    """Each epoch's final state: its last redraw (terminal) or its line."""
    last: dict[str, str] = {}
    for part in re.split(r"[\r\n]", output):
        label = re.match(r"Epoch \d+", part)
        if label:
            last[label.group()] = part.strip()
    return list(last.values())


def _cursor_column_at(output: str, marker: str) -> int:
    """The column where ``marker`` starts once ``output`` is played on a terminal (\\r, \\n,
    cursor up); -1 when it is not there."""
    column = 0
    index = 0
    while index < len(output):
        if output.startswith(marker, index):
            return column
        if output.startswith("\x1b[A", index):
            index += 3
            continue
        char = output[index]
        column = 0 if char in "\r\n" else column + 1
        index += 1
    return -1


def test_standalone_validate_and_test_end_their_lines_in_a_terminal() -> None:
    stream = FakeTerminal()
    trainer = Trainer(logger=False, callbacks=[ProgressBar(stream=stream)])
    trainer.validate(TinyModule(), loader(16))
    trainer.test(TinyModule(), loader(16))
    output = stream.getvalue()
    assert "\r" in output  # bars were drawn
    # The results start at the line's start (before, they followed the cleared bar's width).
    assert _cursor_column_at(output, "Validation: val_loss=") == 0
    assert _cursor_column_at(output, "Test: test_loss=") == 0
    assert output.endswith("\n")


def test_a_terminal_bar_reads_values_only_when_it_redraws(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock stands still: the bar draws at the first batch and at the epoch's end only,
    so what it reads (.item() calls) does not grow with the number of batches."""
    monkeypatch.setattr(
        "ember.callbacks.progress.time", types.SimpleNamespace(perf_counter=lambda: 7.0)
    )

    def count_items(samples: int, bar: bool) -> int:
        calls = 0
        original = torch.Tensor.item

        def counting(self: torch.Tensor) -> Any:
            nonlocal calls
            calls += 1
            return original(self)

        monkeypatch.setattr(torch.Tensor, "item", counting)
        stream = FakeTerminal()
        options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
        callbacks = [ProgressBar(stream=stream)] if bar else []
        Trainer(max_epochs=1, callbacks=callbacks, enable_progress_bar=bar, **options).fit(
            LogsItsLoss(), loader(samples, batch_size=8)
        )
        monkeypatch.setattr(torch.Tensor, "item", original)
        if bar:
            assert stream.getvalue().count("Epoch 1/1") == 3  # opened, first batch, closed
        return calls

    extra_short = count_items(64, True) - count_items(64, False)  # 8 batches
    extra_long = count_items(256, True) - count_items(256, False)  # 32 batches
    assert extra_short == extra_long


def test_terminal_bar_redraws_as_time_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(
        "ember.callbacks.progress.time", types.SimpleNamespace(perf_counter=lambda: clock.now)
    )

    class Slow(LogsItsLoss):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            clock.now += 0.06  # a redraw every second batch (0.1 s apart)
            return super().training_step(batch, batch_idx)

    stream = FakeTerminal()
    options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    Trainer(max_epochs=1, callbacks=[ProgressBar(stream=stream)], **options).fit(
        Slow(), loader(64, batch_size=8)
    )
    drawn = re.findall(r"(\d)/8 \[", stream.getvalue())
    assert drawn == ["0", "1", "3", "5", "7", "8"]
    assert all("train_loss=" in part for part in stream.getvalue().split("\r")[2:])


# --- notebooks -----------------------------------------------------------------------------------


def test_notebook_uses_notebook_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm.std import tqdm as text_tqdm

    created: list[tuple[str | None, bool]] = []
    sink = io.StringIO()

    class FakeNotebookBar(text_tqdm):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            created.append((kwargs.get("desc"), kwargs.get("leave", True)))
            super().__init__(*args, file=sink, **kwargs)

    monkeypatch.setattr("ember.callbacks.progress.in_notebook", lambda: True)
    monkeypatch.setattr("ember.callbacks.progress.notebook_bar_class", lambda: FakeNotebookBar)
    bar = ProgressBar()
    assert bar.is_notebook and bar.draws_bars
    options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    Trainer(max_epochs=2, callbacks=[bar], num_sanity_val_steps=0, **options).fit(
        TinyModule(), loader(32), loader(16)
    )
    assert created == [
        ("Epoch 1/2", True),
        ("Validation", False),
        ("Epoch 2/2", True),
        ("Validation", False),
    ]
    # A stream given by the user is written to as text, even in a notebook.
    assert not ProgressBar(stream=io.StringIO()).is_notebook


def test_notebook_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not in_notebook()  # pytest is no Jupyter kernel
    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    fake_ipython = types.SimpleNamespace(get_ipython=lambda: shell)
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    has_widgets = types.SimpleNamespace(find_spec=lambda name: object())
    no_widgets = types.SimpleNamespace(find_spec=lambda name: None)
    monkeypatch.setattr("ember.callbacks.progress.importlib.util", has_widgets)
    assert in_notebook()
    monkeypatch.setattr("ember.callbacks.progress.importlib.util", no_widgets)
    assert not in_notebook()  # no ipywidgets: tqdm's notebook bar cannot draw
    monkeypatch.setattr("ember.callbacks.progress.importlib.util", has_widgets)
    shell.config = {}  # IPython in a terminal
    assert not in_notebook()


def test_the_test_bar_shows_its_total_as_validation_does() -> None:
    stream = FakeTerminal()
    trainer = Trainer(logger=False, callbacks=[ProgressBar(stream=stream)])
    trainer.validate(TinyModule(), loader(24))  # 3 batches of 8
    trainer.test(TinyModule(), [loader(24), loader(16)])  # 3 + 2 batches
    output = stream.getvalue()
    assert trainer.num_test_batches == [3, 2]
    assert re.search(r"Validation: +0%\|[^|]*\| 0/3 ", output)  # x/N, as validation's
    assert re.search(r"Testing: +0%\|[^|]*\| 0/5 ", output)  # was "Testing: 0it"
    assert "Testing: 0it" not in output


@pytest.mark.parametrize("terminal", [False, True])
def test_resuming_after_an_epochs_last_validation_shows_no_stale_epoch(
    tmp_path: Any, terminal: bool
) -> None:
    """A checkpoint written by the validation at an epoch's last batch (ModelCheckpoint's
    default with a validation loader) resumes with that epoch's end only: no line (or bar)
    for it, since the run that wrote the checkpoint showed it already."""
    from ember.callbacks import ModelCheckpoint

    def fit(epochs: int, stream: io.StringIO, ckpt_path: str | None) -> None:
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = Trainer(
            max_epochs=epochs,
            logger=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            num_sanity_val_steps=0,
            callbacks=[checkpoint, ProgressBar(stream=stream)],
        )
        trainer.fit(TinyModule(), loader(32), loader(16), ckpt_path=ckpt_path)

    first = FakeTerminal() if terminal else io.StringIO()
    fit(2, first, None)
    resumed = FakeTerminal() if terminal else io.StringIO()
    fit(4, resumed, "last")
    assert "Epoch 2/" in first.getvalue()
    output = resumed.getvalue()
    assert "Epoch 2/4" not in output  # the stale "Epoch 2/4: 4 batches in 0.0s (0 steps/s)"
    assert "Epoch 3/4" in output and "Epoch 4/4" in output
    if not terminal:
        assert [line.split(":")[0] for line in output.strip().splitlines()] == [
            "Epoch 3/4",
            "Epoch 4/4",
        ]
