"""``ThroughputMonitor``: samples (and items) per second of training, FLOP/s and MFU."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ember.accelerator.data import infer_batch_size
from ember.callbacks.device_peaks import device_peak_flops
from ember.errors import MisconfigurationError
from ember.hooks import Callback

if TYPE_CHECKING:
    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer

_FOLD_EVERY = 256  # sum the pending item-count tensors this often (bounded memory, no sync)


def _check_positive(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MisconfigurationError(
            f"`ThroughputMonitor({name}={value!r})` is not supported: use a positive number "
            f"(FLOPs{'/s' if name == 'peak_flops' else ''}) or None."
        )


class ThroughputMonitor(Callback):
    """Logs training throughput every ``trainer.log_every_n_steps`` optimizer steps.

    - ``throughput/samples_per_sec``: samples (the first dimension of each batch) processed
      since the last value, divided by the wall time they took;
    - ``throughput/items_per_sec``: when ``training_step`` returns a dict with
      ``"num_items"`` (tokens, say), those items per second;
    - ``throughput/flops_per_sec``: samples per second times the FLOPs of one sample's
      forward and backward;
    - ``throughput/mfu``: the model FLOPs utilization, FLOP/s divided by the devices' dense
      peak (``ember.callbacks.device_peaks`` for the GPU and the Trainer's precision, or
      ``peak_flops``). Not logged on a CPU or an unknown GPU unless ``peak_flops`` is given.

    Samples, items per second and MFU also show in the progress bar.

    FLOPs per sample: with ``flops_per_sample=None`` they are counted on the first training
    batch with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions,
    attention of the real forward and backward; nothing runs twice and training is unchanged)
    and divided by its batch size. That batch is left out of the timing. A compiled model
    (``Trainer(compile=...)`` or a ``torch.compile``d submodule) is not counted: the counting
    mode makes that step run differently (the weights would differ in the last bits), so
    FLOP/s and MFU are not logged and a warning asks for ``flops_per_sample``. Give the number
    yourself when the count is not what you want (a step whose work varies with the batch; for
    a transformer about ``6 * parameters * tokens_per_sample``).

    Validation time is left out, and the clock restarts at each training epoch. The clock is
    the host's: nothing here waits for the device (``num_items`` tensors are summed on the
    device and read only when the value is sent to the loggers), so a single value can be off
    by the few kernels the host runs ahead; over many steps the rate is right.

    With several processes the rates are this process's times the number of processes
    (ember gives every process batches of the same size), and the MFU divides by the peak of
    all of them.

    Args:
        flops_per_sample: FLOPs of one sample's forward and backward; None counts them.
        peak_flops: dense peak FLOP/s of one device; None looks the device up.

    Examples:
        On a CPU, whose peak is not known, give ``peak_flops`` to log the MFU:

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
        >>> from ember.callbacks import ThroughputMonitor
        >>> from ember.loggers import CSVLogger
        >>> monitor = ThroughputMonitor(peak_flops=1e12)
        >>> trainer = ember.Trainer(max_epochs=2, log_every_n_steps=2, callbacks=[monitor],
        ...                         logger=CSVLogger("logs"),
        ...                         enable_progress_bar=False, enable_checkpointing=False,
        ...                         enable_model_summary=False)
        >>> trainer.fit(Regression(), loader)
        >>> monitor.flops_per_sample  # counted on the first batch (Linear(3, 1), both passes)
        12.0
        >>> sorted(trainer.logged_metrics)
        ['throughput/flops_per_sec', 'throughput/mfu', 'throughput/samples_per_sec']
        >>> print(trainer.logger.metrics_file.read_text().splitlines()[0])
        step,throughput/samples_per_sec,throughput/flops_per_sec,throughput/mfu
    """

    def __init__(self, flops_per_sample: float | None = None, peak_flops: float | None = None):
        _check_positive("flops_per_sample", flops_per_sample)
        _check_positive("peak_flops", peak_flops)
        self._given_flops = flops_per_sample
        self._given_peak = peak_flops
        #: FLOPs of one sample's forward and backward in use (given, or counted on the first
        #: batch; None until then)
        self.flops_per_sample: float | None = flops_per_sample
        #: dense peak FLOP/s of one device in use (None: MFU is not logged)
        self.peak_flops: float | None = peak_flops
        self._counter: FlopCounterMode | None = None
        self._may_count = True  # False for a compiled model (decided at each fit's start)
        self._warned_compiled = False
        self._window_start = 0.0
        self._paused_since: float | None = None
        self._paused = 0.0  # validation time inside the current window
        self._samples = 0
        self._items: list[Tensor] = []
        self._items_count = 0  # the part of the item count given as Python ints
        self._has_items = False
        self._last_step = 0  # global step of the last value (or of the start)

    def _reset(self, trainer: Trainer) -> None:
        self._window_start = time.perf_counter()
        self._paused_since = None
        self._paused = 0.0
        self._samples = 0
        self._items = []
        self._items_count = 0
        self._has_items = False
        self._last_step = trainer.global_step

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._reset(trainer)
        self.flops_per_sample = self._given_flops  # counted again for each fit
        self.peak_flops = self._given_peak
        self._may_count = not _is_compiled(trainer, module)
        uncounted = self.flops_per_sample is None and not self._may_count
        if uncounted and trainer.is_global_zero and not self._warned_compiled:
            self._warned_compiled = True
            warnings.warn(
                "ThroughputMonitor: the model is compiled, so its FLOPs are not counted "
                "(counting would change how the compiled step runs, and the weights), and "
                "throughput/flops_per_sec and throughput/mfu are not logged. Pass "
                "ThroughputMonitor(flops_per_sample=...) to log them.",
                stacklevel=2,
            )
        if self.peak_flops is None:
            accelerator = trainer.accelerator
            self.peak_flops = device_peak_flops(accelerator.device, accelerator.mixed_precision)
            if self.peak_flops is None and trainer.is_global_zero:
                warnings.warn(
                    "ThroughputMonitor: throughput/mfu is not logged: the peak FLOP/s of "
                    f"{_device_name(accelerator.device)} at precision "
                    f"{accelerator.mixed_precision!r} is not known. Pass "
                    "ThroughputMonitor(peak_flops=...) (dense FLOP/s of one device) to log it.",
                    stacklevel=2,
                )

    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._reset(trainer)

    def on_train_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
    ) -> None:
        if self.flops_per_sample is None and self._may_count and self._counter is None:
            # Counts what runs until on_train_batch_end: the step's forward and backward.
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.state.stage == "fit" and not trainer.sanity_checking:
            self._paused_since = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._paused_since is not None:
            self._paused += time.perf_counter() - self._paused_since
            self._paused_since = None

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:
            self._finish_count(batch)
            self._reset(trainer)  # the counted batch ran slower: it is not timed
            return
        self._samples += infer_batch_size(batch)
        if isinstance(outputs, Mapping):
            num_items = outputs.get("num_items")
            if num_items is not None:
                self._add_items(num_items)
        step = trainer.global_step
        if step != self._last_step and step % trainer.log_every_n_steps == 0:
            self._log(trainer, module)

    def _finish_count(self, batch: Any) -> None:
        counter = self._counter
        assert counter is not None
        self._counter = None
        counter.__exit__(None, None, None)
        total = counter.get_total_flops()
        if total > 0:
            self.flops_per_sample = total / infer_batch_size(batch)
        else:
            self.flops_per_sample = 0.0  # not counted again
            warnings.warn(
                "ThroughputMonitor: no FLOPs were counted in the first training batch (no "
                "matrix product or convolution seen), so throughput/flops_per_sec and "
                "throughput/mfu are not logged. Pass ThroughputMonitor(flops_per_sample=...).",
                stacklevel=2,
            )

    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        if self._counter is not None:  # never leave the counting mode on
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)

    def _add_items(self, num_items: Any) -> None:
        self._has_items = True
        if isinstance(num_items, Tensor):
            self._items.append(num_items.detach().reshape(()))
            if len(self._items) >= _FOLD_EVERY:
                self._items = [torch.stack(self._items).sum()]
        else:
            self._items_count += int(num_items)

    def _log(self, trainer: Trainer, module: TrainModule) -> None:
        now = time.perf_counter()
        elapsed = now - self._window_start - self._paused
        if elapsed > 0:
            scale = trainer.world_size / elapsed
            samples_per_sec = self._samples * scale
            _log(module, "throughput/samples_per_sec", samples_per_sec, prog_bar=True)
            if self._has_items:
                items: Tensor | int = self._items_count
                if self._items:  # stays a device tensor: read only when flushed
                    items = torch.stack(self._items).sum() + self._items_count
                _log(module, "throughput/items_per_sec", items * scale, prog_bar=True)
            if self.flops_per_sample:
                flops_per_sec = samples_per_sec * self.flops_per_sample
                _log(module, "throughput/flops_per_sec", flops_per_sec, prog_bar=False)
                if self.peak_flops is not None:
                    mfu = flops_per_sec / (self.peak_flops * trainer.world_size)
                    _log(module, "throughput/mfu", mfu, prog_bar=True)
        self._reset(trainer)
        self._window_start = now


def _log(module: TrainModule, name: str, value: Any, prog_bar: bool) -> None:
    module.log(name, value, on_step=True, on_epoch=False, prog_bar=prog_bar, logger=True)


def _is_compiled(trainer: Trainer, module: TrainModule) -> bool:
    """Whether the steps run compiled: ``Trainer(compile=...)``, or a ``torch.compile``d
    module inside ``module``."""
    if trainer.compile is not False:
        return True
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(child, OptimizedModule) for child in module.modules())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"the GPU {torch.cuda.get_device_name(device)!r}"
    return f"the device {str(device)!r}"
