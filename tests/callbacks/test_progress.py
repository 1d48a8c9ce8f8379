"""ProgressBar: bars in a terminal, one line per epoch elsewhere."""

from __future__ import annotations

import io
from typing import Any

import pytest

from ember import MisconfigurationError, Trainer
from ember.callbacks import ProgressBar
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
