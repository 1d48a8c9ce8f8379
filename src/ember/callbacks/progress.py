"""``ProgressBar``: a tqdm bar in a terminal or a notebook, one line per epoch anywhere else."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from ember.errors import MisconfigurationError
from ember.hooks import Callback

if TYPE_CHECKING:
    from tqdm import tqdm

    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer

#: Seconds between two redraws of the training bar (tqdm's own default). Between them a step
#: costs the bar a counter and a clock read: no formatting, no tensor read (no device sync).
DRAW_INTERVAL = 0.1


def format_metrics(metrics: dict[str, float]) -> str:
    """``name=value`` pairs, 4 significant digits, in a stable order."""
    return ", ".join(f"{name}={value:.4g}" for name, value in metrics.items())


def format_rate(per_second: float) -> str:
    """A rate with one decimal, or three significant digits below 1 (``0.0123``)."""
    return f"{per_second:.1f}" if per_second >= 1 else f"{per_second:.3g}"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel that can show widget bars (ipywidgets)."""
    ipython = sys.modules.get("IPython")  # never imported here: a script has no kernel
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return False  # a terminal IPython draws text bars like any terminal
    return importlib.util.find_spec("ipywidgets") is not None


def notebook_bar_class() -> type[tqdm[Any]]:
    from tqdm.notebook import tqdm as notebook_tqdm

    return notebook_tqdm


def text_bar_class() -> type[tqdm[Any]]:
    from tqdm.std import tqdm as text_tqdm

    return text_tqdm


class ProgressBar(Callback):
    """Shows progress, the training loss and the metrics logged with ``prog_bar=True``.

    - In a terminal: a bar per epoch (batches done, rate, time left, metrics), and a short
      bar per validation that disappears when it ends.
    - In a Jupyter notebook (with ipywidgets): the same bars as notebook widgets.
    - Anywhere else (a log file, CI): one line per epoch with its batches, time, optimizer
      steps per second and metrics, so logs stay readable.

    The loss is the one ``training_step`` returned, shown as ``loss``, unless a
    ``prog_bar`` value already shows it (``self.log("train_loss", loss, prog_bar=True)``):
    each value appears once. An epoch's last line shows that epoch's values: validation
    results appear on it only when a validation ran in that epoch.

    Drawing costs nothing on the steps in between: the bar is redrawn at most every
    ``refresh_rate`` batches and every 0.1 s, and only then are the values read (a device
    sync on a GPU).

    Args:
        refresh_rate: redraw at most every this many batches (0 hides the bars and lines).
        stream: where to write (default ``sys.stdout``; a notebook's widgets are used only
            with the default).

    Examples:
        Written to a file-like object, the bar is one line per epoch:

        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> class Regression(ember.TrainModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.layer = nn.Linear(3, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.mse_loss(self.layer(x), y)
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> x = torch.randn(64, 3)
        >>> loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16)
        >>> import io
        >>> from ember.callbacks import ProgressBar
        >>> output = io.StringIO()
        >>> trainer = ember.Trainer(max_epochs=2, callbacks=[ProgressBar(stream=output)],
        ...                         logger=False, enable_checkpointing=False,
        ...                         enable_model_summary=False)
        >>> trainer.fit(Regression(), loader)
        >>> print(output.getvalue())  # doctest: +ELLIPSIS
        Epoch 1/2: 4 batches in ...s (... steps/s), loss=...
        Epoch 2/2: 4 batches in ...s (... steps/s), loss=...

        ``enable_progress_bar=True`` (the default) adds ``ProgressBar()`` when no
        ``callbacks`` entry is one; ``ProgressBar(refresh_rate=0)`` hides it.
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
        self._epoch_first_step = 0
        self._epoch_first_batch = 0  # where the epoch started: > 0 when resumed mid-epoch
        self._next_draw = 0.0
        self._outputs: Any = None  # the last training_step output that was not None
        self._validated = False  # whether a validation ran in the current training epoch
        self._eval_names: set[str] = set()  # the names the last validation logged

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def is_terminal(self) -> bool:
        """Whether the output is a terminal (bars) rather than a file or a pipe (lines)."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    @property
    def is_notebook(self) -> bool:
        """Whether bars are drawn as notebook widgets (a Jupyter kernel, default stream)."""
        return self._stream is None and in_notebook()

    @property
    def draws_bars(self) -> bool:
        """Bars (terminal or notebook) rather than one line per epoch."""
        return self.is_notebook or self.is_terminal

    def _enabled(self, trainer: Trainer) -> bool:
        return self.refresh_rate > 0 and trainer.is_global_zero

    def _bar(self, total: int | None, description: str, leave: bool, **options: Any) -> tqdm[Any]:
        if self.is_notebook:
            return notebook_bar_class()(total=total, desc=description, leave=leave, **options)
        # Below the training bar while one is open (validation inside fit), else in its place:
        # a standalone validate/test bar is cleared back to the line's start.
        position = 1 if self._train_bar is not None else 0
        return text_bar_class()(
            total=total,
            desc=description,
            leave=leave,
            file=self.stream,
            dynamic_ncols=True,
            smoothing=0,  # the rate and time left from the whole epoch, not the last batches
            position=position,
            **options,
        )

    # --- training ----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._epoch_started = time.perf_counter()
        self._epoch_first_step = trainer.global_step
        self._epoch_first_batch = trainer.state.batch_idx
        self._validated = False
        self._next_draw = 0.0
        if self._enabled(trainer) and self.draws_bars and not self._nothing_left(trainer):
            # It draws whenever asked: on_train_batch_end keeps the time itself.
            self._train_bar = self._bar(
                trainer.num_training_batches,
                self._epoch_label(trainer),
                leave=True,
                mininterval=0,
                miniters=1,
            )

    def _nothing_left(self, trainer: Trainer) -> bool:
        """A resumed epoch whose batches all ran before its checkpoint was written (at the
        validation of its last batch): only its end-of-epoch bookkeeping is left, already
        shown by the run that wrote the checkpoint."""
        total = trainer.num_training_batches
        first = self._epoch_first_batch
        return first > 0 and total is not None and first >= total

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs every step: keep the output, and only when a redraw is due read the values
        # (one sync) and format them.
        if outputs is not None:
            self._outputs = outputs
        bar = self._train_bar  # None when no bar is drawn (lines, disabled, other ranks)
        if bar is None or (batch_idx + 1) % self.refresh_rate:
            return
        now = time.perf_counter()
        if now < self._next_draw:
            return
        self._next_draw = now + DRAW_INTERVAL
        bar.set_postfix_str(format_metrics(self.metrics(trainer)), refresh=False)
        bar.update(batch_idx + 1 - bar.n)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._enabled(trainer) or self._nothing_left(trainer):
            return
        metrics = self.metrics(trainer)
        if not self._validated:  # results of an earlier epoch's validation are not this one's
            metrics = {
                name: value for name, value in metrics.items() if name not in self._eval_names
            }
        batches = trainer.state.batch_idx  # batches of this epoch processed so far
        bar = self._train_bar
        if bar is not None:
            bar.set_postfix_str(format_metrics(metrics), refresh=False)
            bar.n = batches  # drawn once, by close
            bar.close()
            self._train_bar = None
        elif not self.draws_bars:
            elapsed = time.perf_counter() - self._epoch_started
            steps = trainer.global_step - self._epoch_first_step
            line = f"{self._epoch_label(trainer)}: {batches} batches in {elapsed:.1f}s"
            if elapsed > 0:
                line += f" ({format_rate(steps / elapsed)} steps/s)"
            if metrics:
                line += f", {format_metrics(metrics)}"
            print(line, file=self.stream, flush=True)

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        """What the bar shows: the latest training loss as ``loss`` (unless a ``prog_bar``
        value equals it: the module logged the loss itself), then the ``prog_bar`` values."""
        shown = trainer.progress_bar_metrics
        outputs = self._outputs
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return dict(shown)
        value = float(loss.item()) if hasattr(loss, "item") else float(loss)
        if value in shown.values():
            return dict(shown)
        return {"loss": value, **shown}

    def _epoch_label(self, trainer: Trainer) -> str:
        limit = trainer.max_epochs
        of = f"/{limit}" if limit is not None and limit > 0 else ""
        return f"Epoch {trainer.current_epoch + 1}{of}"

    # --- evaluation ---------------------------------------------------------------------------
    def _eval_start(self, trainer: Trainer, description: str, totals: list[int | None]) -> None:
        if self._enabled(trainer) and self.draws_bars:
            known = [t for t in totals if t is not None]
            total = sum(known) if totals and len(known) == len(totals) else None
            if trainer.sanity_checking and trainer.num_sanity_val_steps > 0 and total is not None:
                total = min(total, trainer.num_sanity_val_steps * len(totals))
            self._eval_bar = self._bar(total, description, leave=False)

    def _eval_batch_end(self) -> None:
        bar = self._eval_bar
        if bar is not None:
            bar.update(1)

    def _close_eval_bar(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None

    def _eval_end(self, trainer: Trainer, description: str, standalone: bool) -> None:
        self._close_eval_bar()
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
        if trainer.state.stage == "fit" and not trainer.sanity_checking:
            self._validated = True
            self._eval_names = set(trainer.last_eval_metrics)
        self._eval_end(trainer, "Validation", standalone=trainer.state.stage == "validate")

    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, "Testing", trainer.num_test_batches)

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
        self._close_eval_bar()

    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        for bar in (self._eval_bar, self._train_bar):
            if bar is not None:
                bar.close()
        self._train_bar = self._eval_bar = None
