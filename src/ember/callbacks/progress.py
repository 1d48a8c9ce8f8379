"""``ProgressBar``: a tqdm bar in a terminal, one line per epoch anywhere else."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from ember.errors import MisconfigurationError
from ember.hooks import Callback

if TYPE_CHECKING:
    from tqdm import tqdm

    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer


def format_metrics(metrics: dict[str, float]) -> str:
    """``name=value`` pairs, 4 significant digits, in a stable order."""
    return ", ".join(f"{name}={value:.4g}" for name, value in metrics.items())


class ProgressBar(Callback):
    """Shows progress, the training loss and the metrics logged with ``prog_bar=True``.

    In a terminal it draws tqdm bars, refreshed every ``refresh_rate`` batches. When the
    output is not a terminal (a log file, CI), it prints one line per epoch instead of
    redrawing, so logs stay readable.

    Args:
        refresh_rate: update the bar every this many batches (0 hides the bars and lines).
        stream: where to write (default ``sys.stdout``).
    """

    def __init__(self, refresh_rate: int = 1, stream: TextIO | None = None) -> None:
        if not isinstance(refresh_rate, int) or isinstance(refresh_rate, bool) or refresh_rate < 0:
            raise MisconfigurationError(
                f"`ProgressBar(refresh_rate={refresh_rate!r})` is not supported: use an integer "
                ">= 0 (0 disables the bar)."
            )
        self.refresh_rate = refresh_rate
        self._stream = stream
        self._train_bar: tqdm[Any] | None = None
        self._eval_bar: tqdm[Any] | None = None
        self._epoch_started = 0.0
        self._outputs: Any = None  # the last training_step output that was not None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def is_terminal(self) -> bool:
        """Whether the output is a terminal (bars) rather than a file or a pipe (lines)."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _enabled(self, trainer: Trainer) -> bool:
        return self.refresh_rate > 0 and trainer.is_global_zero

    def _bar(self, total: int | None, description: str, leave: bool) -> tqdm[Any]:
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=description,
            leave=leave,
            file=self.stream,
            dynamic_ncols=True,
            smoothing=0,
            position=0 if leave else 1,
        )

    # --- training ----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._epoch_started = time.perf_counter()
        if self._enabled(trainer) and self.is_terminal:
            self._train_bar = self._bar(
                trainer.num_training_batches, self._epoch_label(trainer), leave=True
            )

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The loss comes from what training_step returned; it is read (one sync) only when
        # the bar is redrawn or the epoch's line printed.
        if outputs is not None:
            self._outputs = outputs
        bar = self._train_bar  # None when the output is not a terminal: nothing to redraw
        if bar is not None and (batch_idx + 1) % self.refresh_rate == 0:
            bar.set_postfix_str(format_metrics(self.metrics(trainer)), refresh=False)
            bar.update(batch_idx + 1 - bar.n)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._enabled(trainer):
            return
        metrics = self.metrics(trainer)
        batches = trainer.state.batch_idx  # batches of this epoch processed so far
        bar = self._train_bar
        if bar is not None:
            bar.update(batches - bar.n)
            bar.set_postfix_str(format_metrics(metrics))
            bar.close()
            self._train_bar = None
        elif not self.is_terminal:
            elapsed = time.perf_counter() - self._epoch_started
            line = f"{self._epoch_label(trainer)}: {batches} batches in {elapsed:.1f}s"
            if metrics:
                line += f", {format_metrics(metrics)}"
            print(line, file=self.stream, flush=True)

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        """What the bar shows: the latest training loss, then the ``prog_bar`` metrics."""
        loss = self._outputs.get("loss") if isinstance(self._outputs, dict) else self._outputs
        shown = {} if loss is None else {"loss": float(loss.item())}
        shown.update(trainer.progress_bar_metrics)
        return shown

    def _epoch_label(self, trainer: Trainer) -> str:
        limit = trainer.max_epochs
        of = f"/{limit}" if limit is not None and limit > 0 else ""
        return f"Epoch {trainer.current_epoch + 1}{of}"

    # --- evaluation ---------------------------------------------------------------------------
    def _eval_start(self, trainer: Trainer, description: str, totals: list[int | None]) -> None:
        if self._enabled(trainer) and self.is_terminal:
            known = [t for t in totals if t is not None]
            total = sum(known) if totals and len(known) == len(totals) else None
            if trainer.sanity_checking and trainer.num_sanity_val_steps > 0 and total is not None:
                total = min(total, trainer.num_sanity_val_steps * len(totals))
            self._eval_bar = self._bar(total, description, leave=False)

    def _eval_batch_end(self) -> None:
        bar = self._eval_bar
        if bar is not None:
            bar.update(1)

    def _eval_end(self, trainer: Trainer, description: str, standalone: bool) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None
        # Inside fit, validation results show on the epoch's line; validate()/test() print here.
        if standalone and self._enabled(trainer) and not trainer.sanity_checking:
            results = format_metrics(trainer.last_eval_metrics) or "nothing logged"
            print(f"{description}: {results}", file=self.stream, flush=True)

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        label = "Sanity check" if trainer.sanity_checking else "Validation"
        self._eval_start(trainer, label, trainer.num_val_batches)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end()

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end(trainer, "Validation", standalone=trainer.state.stage == "validate")

    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, "Testing", [None])

    def on_test_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end()

    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end(trainer, "Test", standalone=True)

    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, "Predicting", [None])

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end()

    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None

    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        for bar in (self._train_bar, self._eval_bar):
            if bar is not None:
                bar.close()
        self._train_bar = self._eval_bar = None
