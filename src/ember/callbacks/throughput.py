"""``ThroughputMonitor``: samples (and items) per second of training, logged every few steps."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ember.accelerator.data import infer_batch_size
from ember.hooks import Callback

if TYPE_CHECKING:
    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer

_FOLD_EVERY = 256  # sum the pending item-count tensors this often (bounded memory, no sync)


class ThroughputMonitor(Callback):
    """Logs ``throughput/samples_per_sec`` and, when reported, ``throughput/items_per_sec``.

    Every ``trainer.log_every_n_steps`` optimizer steps it logs the samples (the first
    dimension of each batch) processed since its last value, divided by the wall time they
    took. When ``training_step`` returns a dict with ``"num_items"`` (tokens, say), it also
    logs those items per second. Validation time is left out, and the clock restarts at each
    training epoch, so set-up and the previous epoch's tail do not count.

    The clock is the host's (``time.perf_counter``). On a GPU the host runs ahead of the
    device by a few queued kernels, so a single value can be off by that much; over a window
    of many steps the queue is bounded and the rate is right. Nothing here waits for the
    device: ``num_items`` tensors are summed on the device and read only when the value is
    sent to the loggers.

    With several processes the rates are this process's, multiplied by the number of
    processes (ember gives every process batches of the same size).
    """

    def __init__(self) -> None:
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

    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._reset(trainer)

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
        self._samples += infer_batch_size(batch)
        if isinstance(outputs, Mapping):
            num_items = outputs.get("num_items")
            if num_items is not None:
                self._add_items(num_items)
        step = trainer.global_step
        if step != self._last_step and step % trainer.log_every_n_steps == 0:
            self._log(trainer, module)

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
            module.log(
                "throughput/samples_per_sec",
                self._samples * scale,
                on_step=True,
                on_epoch=False,
                logger=True,
            )
            if self._has_items:
                items: Tensor | int = self._items_count
                if self._items:  # stays a device tensor: read only when flushed
                    items = torch.stack(self._items).sum() + self._items_count
                module.log(
                    "throughput/items_per_sec",
                    items * scale,
                    on_step=True,
                    on_epoch=False,
                    logger=True,
                )
        self._reset(trainer)
        self._window_start = now
