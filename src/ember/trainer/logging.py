"""What ``self.log`` received: kept as detached tensors, reduced only when someone reads.

Per batch, ``log`` does a dict lookup and a list append; it never calls ``.item()``. Values
become floats (one device sync) when the trainer flushes to the loggers every
``log_every_n_steps`` steps, at the end of an epoch, or when ``callback_metrics`` is read.
Across processes, ``sync_dist=True`` values and torchmetrics objects are reduced at epoch end
by ``ember.trainer.epoch_sync`` (exactly, with a handful of collectives for all names).
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import torch
from torch import Tensor

from ember.accelerator.data import infer_batch_size
from ember.errors import MisconfigurationError, one_of
from ember.trainer.epoch_sync import Description, EpochSync, synchronize

REDUCTIONS = ("mean", "sum", "min", "max")
_RESERVED_SUFFIX = re.compile(r"/dataloader_idx_\d+$")
_FOLD_EVERY = 1024  # fold the per-step values into one running value this often


def is_metric(value: Any) -> bool:
    """Whether ``value`` is a ``torchmetrics.Metric`` (without importing torchmetrics)."""
    module = sys.modules.get("torchmetrics")
    return module is not None and isinstance(value, module.Metric)


def to_float(value: Any) -> float:
    """A Python float from a number or a one-element tensor."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class _Series:
    """One name logged in one run of a loop, and how to reduce it."""

    __slots__ = (
        "dataloader_idx",
        "epoch_key",
        "in_batch",
        "logger",
        "metric",
        "name",
        "on_epoch",
        "on_step",
        "options",
        "prog_bar",
        "reduce_fx",
        "step_key",
        "sync_dist",
        "values",
        "weights",
    )

    def __init__(
        self,
        name: str,
        on_step: bool,
        on_epoch: bool,
        reduce_fx: str,
        prog_bar: bool,
        logger: bool,
        sync_dist: bool,
        dataloader_idx: int | None,
        in_batch: bool = True,
    ) -> None:
        both = on_step and on_epoch
        self.name = name
        # With several loaders `name` ends with "/dataloader_idx_N", which stays last:
        # "loss_step/dataloader_idx_0" (Lightning's keys).
        suffix = "" if dataloader_idx is None else f"/dataloader_idx_{dataloader_idx}"
        base = name[: len(name) - len(suffix)] if suffix and name.endswith(suffix) else name
        suffix = name[len(base) :]
        self.step_key = f"{base}_step{suffix}" if both else name
        self.epoch_key = f"{base}_epoch{suffix}" if both else name
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.reduce_fx = reduce_fx
        self.prog_bar = prog_bar
        self.logger = logger
        self.sync_dist = sync_dist
        self.dataloader_idx = dataloader_idx
        #: first logged while a batch was in flight (not in an epoch-level hook)
        self.in_batch = in_batch
        self.values: list[Any] = []
        self.weights: list[float] = []
        self.metric: Any = None
        #: the options of the call that created it, as given, with the hook's defaults (one
        #: tuple comparison per call tells a repeat with the same options); None: unknown
        self.options: tuple[Any, ...] | None = None

    def add(self, value: Any, weight: float) -> None:
        self.values.append(value)
        self.weights.append(weight)
        if len(self.values) >= _FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Replace the stored values by one value with the same reduction (bounded memory)."""
        if len(self.values) <= 1:
            return
        total_weight = sum(self.weights)
        # A Python float: kept in float64 (a tensor would be cast to float32 with the others).
        value = float(self._reduce_local())
        self.values = [value]
        self.weights = [total_weight]

    def host_values(self) -> tuple[Tensor, Tensor]:
        """The stored values and their weights, float64 on the host (empty when none)."""
        if not self.values:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty
        # One stack on the device, one copy to the host, reduced in float64 there: this runs
        # at epoch end (or every _FOLD_EVERY steps), never per step.
        tensors = [v.reshape(()).float() for v in self.values if isinstance(v, Tensor)]
        numbers = [float(v) for v in self.values if not isinstance(v, Tensor)]
        host: list[Tensor] = []
        if tensors:
            host.append(torch.stack(_on_one_device(tensors)).to("cpu", torch.float64))
        if numbers:
            host.append(torch.tensor(numbers, dtype=torch.float64))
        values = torch.cat(host) if len(host) > 1 else host[0]
        if len(host) > 1:  # restore the order of the weights
            order = [i for i, v in enumerate(self.values) if isinstance(v, Tensor)]
            order += [i for i, v in enumerate(self.values) if not isinstance(v, Tensor)]
            weights = torch.tensor([self.weights[i] for i in order], dtype=torch.float64)
        else:
            weights = torch.tensor(self.weights, dtype=torch.float64)
        return values, weights

    def _reduce_local(self) -> Tensor:
        values, weights = self.host_values()
        if self.reduce_fx == "mean":
            return (values * weights).sum() / weights.sum()
        if self.reduce_fx == "sum":
            return values.sum()
        if self.reduce_fx == "min":
            return values.min()
        return values.max()

    def local_value(self) -> float:
        """The epoch value of this process alone (the metric's ``compute()`` for a metric)."""
        if self.metric is not None:
            return to_float(self.metric.compute())
        return to_float(self._reduce_local())


def _on_one_device(values: list[Any]) -> list[Any]:
    devices = {value.device for value in values if isinstance(value, Tensor)}
    if len(devices) <= 1:
        return values
    return [value.cpu() if isinstance(value, Tensor) else value for value in values]


class MetricStore:
    """Everything logged during one run of a loop (a training epoch, a validation run).

    The loop sets ``default_on_step`` / ``default_on_epoch`` for the hook being run,
    ``batch`` for the batch in flight (its size is inferred only when a mean needs it; None
    outside batches, in the epoch-level hooks) and ``dataloader_idx`` when several evaluation
    loaders run.
    """

    # Slots: `log` reads these on every call.
    __slots__ = (
        "_latest",
        "_prog_bar",
        "_unflushed",
        "batch",
        "dataloader_idx",
        "default_on_epoch",
        "default_on_step",
        "open",
        "series",
    )

    def __init__(self, shares_latest_with: MetricStore | None = None) -> None:
        """A new store; with ``shares_latest_with``, both write their latest values (and
        progress-bar names) into the same dict, so ``callback_metrics`` shows them together."""
        self.series: dict[str, _Series] = {}
        self.default_on_step = True
        self.default_on_epoch = False
        self.batch: Any = None
        self.dataloader_idx: int | None = None
        #: Whether a loop run is under way (between ``start`` and ``close``): values logged
        #: outside one would never be reduced, so ``log`` refuses them.
        self.open = False
        #: latest value of every name, possibly still a tensor until read
        self._latest: dict[str, Any] = {}
        #: step values waiting for the next flush to the loggers
        self._unflushed: dict[str, Any] = {}
        #: names shown in the progress bar
        self._prog_bar: set[str] = set()
        if shares_latest_with is not None:
            self._latest = shares_latest_with._latest
            self._prog_bar = shares_latest_with._prog_bar

    # --- writing -----------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        prog_bar: bool = False,
        logger: bool = True,
        reduce_fx: str = "mean",
        sync_dist: bool = False,
        batch_size: int | None = None,
    ) -> None:
        """Record ``value`` under ``name`` (see ``TrainModule.log``)."""
        if not self.open:
            raise MisconfigurationError(
                f"self.log({name!r}, ...) was called where ember cannot record it. Log in "
                "training_step, validation_step, test_step, their batch hooks, or the "
                "on_train_start, on_validation_start, on_test_start and on_*_epoch_start / "
                "on_*_epoch_end hooks; not in setup, teardown, on_fit_*, on_train_end, "
                "on_validation_end, on_test_end or predict."
            )
        if on_step and self.batch is None:
            raise MisconfigurationError(
                f"self.log({name!r}, ..., on_step=True) was called in an epoch-level hook "
                "(on_*_start, on_*_epoch_start, on_*_epoch_end), where there is no step. Log "
                "it with on_step=False (the default there), or from a batch hook."
            )
        key = name if self.dataloader_idx is None else self._suffixed(name)
        series = self.series.get(key)
        # default_on_epoch is always the opposite of default_on_step: not compared.
        options = (on_step, on_epoch, reduce_fx, sync_dist, self.default_on_step)
        if series is None:
            series = self._new_series(
                name, value, on_step, on_epoch, prog_bar, logger, reduce_fx, sync_dist
            )
            series.options = options
        elif options != series.options:
            self._check_same_options(series, name, on_step, on_epoch, reduce_fx, sync_dist)
        if type(value) is Tensor or isinstance(value, Tensor):
            if value.numel() != 1:
                raise MisconfigurationError(
                    f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}; "
                    "only scalars (one element) can be logged. Reduce it first, e.g. .mean()."
                )
            value = value.detach()
        elif is_metric(value):
            series.metric = value
            value = getattr(value, "_forward_cache", None)
            if value is None:
                return
            if isinstance(value, Tensor):
                value = value.detach()
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise MisconfigurationError(
                f"self.log({name!r}, ...) got a value of type {type(value).__name__}; it accepts "
                "a number, a one-element tensor or a torchmetrics.Metric."
            )
        if series.on_step:
            self._latest[series.step_key] = value
            if series.on_epoch:  # both: the plain name shows the step value during the epoch
                self._latest[series.name] = value
            if series.logger:
                self._unflushed[series.step_key] = value
        if series.on_epoch and series.metric is None:
            weight = 1.0
            if series.reduce_fx == "mean":
                weight = float(batch_size) if batch_size is not None else self._batch_size()
            series.add(value, weight)

    def _check_same_options(
        self,
        series: _Series,
        name: str,
        on_step: bool | None,
        on_epoch: bool | None,
        reduce_fx: str,
        sync_dist: bool,
    ) -> None:
        """Refuse a second ``log`` of ``name`` in this epoch whose options differ from the
        first's: the two could not be reduced into one value."""
        given = {
            "on_step": self.default_on_step if on_step is None else on_step,
            "on_epoch": self.default_on_epoch if on_epoch is None else on_epoch,
            "reduce_fx": reduce_fx,
            "sync_dist": sync_dist,
        }
        first = {
            "on_step": series.on_step,
            "on_epoch": series.on_epoch,
            "reduce_fx": series.reduce_fx,
            "sync_dist": series.sync_dist,
        }
        differ = [
            f"{option}={first[option]!r} then {given[option]!r}"
            for option in given
            if given[option] != first[option]
        ]
        if differ:
            raise MisconfigurationError(
                f"self.log({name!r}, ...) was called twice in one epoch with different options "
                f"({', '.join(differ)}; on_step / on_epoch as resolved for the hook, e.g. a "
                "batch hook and an epoch-end hook have different defaults). Log it with the "
                "same options each time, or under two names."
            )

    def _suffixed(self, name: str) -> str:
        return (
            name if self.dataloader_idx is None else f"{name}/dataloader_idx_{self.dataloader_idx}"
        )

    def _new_series(
        self,
        name: str,
        value: Any,
        on_step: bool | None,
        on_epoch: bool | None,
        prog_bar: bool,
        logger: bool,
        reduce_fx: str,
        sync_dist: bool,
    ) -> _Series:
        if not isinstance(name, str) or not name:
            raise MisconfigurationError(f"self.log needs a non-empty string name, got {name!r}.")
        if _RESERVED_SUFFIX.search(name):
            raise MisconfigurationError(
                f"self.log({name!r}, ...): a name ending in '/dataloader_idx_<N>' is reserved; "
                "ember adds that suffix itself when several evaluation loaders run. Choose "
                "another name."
            )
        if reduce_fx not in REDUCTIONS:
            raise MisconfigurationError(one_of("reduce_fx", reduce_fx, REDUCTIONS))
        on_step = self.default_on_step if on_step is None else on_step
        on_epoch = self.default_on_epoch if on_epoch is None else on_epoch
        if not (on_step or on_epoch):
            raise MisconfigurationError(
                f"self.log({name!r}, ..., on_step=False, on_epoch=False) would record nothing: "
                "set on_step=True, on_epoch=True or both."
            )
        series = _Series(
            self._suffixed(name),
            on_step,
            on_epoch,
            reduce_fx,
            prog_bar,
            logger,
            sync_dist,
            self.dataloader_idx,
            in_batch=self.batch is not None,
        )
        self.series[self._suffixed(name)] = series
        if prog_bar:
            self._prog_bar.update({series.step_key, series.epoch_key})
        return series

    def adopt(self, description: Description) -> None:
        """Add a series that other processes logged and this one did not (it ran no batch of
        that loader): it takes part in the epoch's reduction with nothing of its own."""
        series = _Series(
            description.name,
            description.on_step,
            description.on_epoch,
            "mean" if description.reduce_fx == "metric" else description.reduce_fx,
            description.prog_bar,
            description.logger,
            True,
            description.dataloader_idx,
            in_batch=description.in_batch,
        )
        self.series[description.key] = series
        if description.prog_bar:
            self._prog_bar.update({series.step_key, series.epoch_key})

    def _batch_size(self) -> float:
        # Inferred lazily and once per batch: most log calls never need it.
        if not isinstance(self.batch, _SizedBatch):
            self.batch = _SizedBatch(self.batch)
        return self.batch.size

    def set_latest(self, key: str, value: Any) -> None:
        """Record a value the trainer computed itself (``skipped_steps``, say)."""
        self._latest[key] = value

    # --- reading -------------------------------------------------------------------------------
    def latest(self) -> dict[str, float]:
        """Every name's latest value as a float (converts pending tensors once)."""
        for key, value in self._latest.items():
            if not isinstance(value, float):
                self._latest[key] = to_float(value)
        return self._latest

    def progress_bar_metrics(self) -> dict[str, float]:
        """The latest values of the names logged with ``prog_bar=True``."""
        latest = self.latest()
        return {key: latest[key] for key in latest if key in self._prog_bar}

    @property
    def has_step_metrics(self) -> bool:
        """Whether step values wait for the loggers (a cheap check, no conversion)."""
        return bool(self._unflushed)

    def pop_step_metrics(self) -> dict[str, float]:
        """Step values logged since the last call, as floats, for the loggers."""
        metrics = {key: to_float(value) for key, value in self._unflushed.items()}
        self._unflushed.clear()
        return metrics

    def reduce_epoch(
        self, sync: EpochSync | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Reduce every on_epoch series and reset the logged metrics.

        With ``sync`` of several processes, every process must call this at the same point:
        series logged with ``sync_dist=True`` and torchmetrics objects are reduced over all
        of them (``ember.trainer.epoch_sync``); the others keep this process's values.

        Returns:
            ``(all_values, for_loggers)``: every epoch value, and those logged with
            ``logger=True``.
        """
        synced: dict[str, float] = {}
        if sync is not None and sync.world_size > 1:
            synced = synchronize(self, sync)
        values: dict[str, float] = {}
        for_loggers: dict[str, float] = {}
        plain: dict[str, float] = {}
        metrics: dict[int, Any] = {}
        for key, series in self.series.items():
            value: float | None = synced.get(key)
            if value is None and series.on_epoch and (series.values or series.metric is not None):
                value = series.local_value()
            if value is not None:
                values[series.epoch_key] = value
                if series.on_step:  # both: the plain name shows the epoch value from now on
                    plain[series.name] = value
                if series.logger:
                    for_loggers[series.epoch_key] = value
            if series.metric is not None:
                metrics[id(series.metric)] = series.metric
                # Reduced once: a second pass (after the epoch-end hooks) skips it unless the
                # metric is logged again.
                series.metric = None
            series.values, series.weights = [], []
        # Reset after every compute: one metric logged under several names (one per loader)
        # gives each name the same value, with one process as with several.
        for metric in metrics.values():
            metric.reset()
        self._latest.update(values)
        self._latest.update(plain)
        return values, for_loggers

    def values_by_dataloader(self, values: dict[str, float]) -> dict[int, dict[str, float]]:
        """Split epoch values by the evaluation loader they were logged under."""
        grouped: dict[int, dict[str, float]] = {}
        for series in self.series.values():
            if series.epoch_key in values:
                grouped.setdefault(series.dataloader_idx or 0, {})[series.epoch_key] = values[
                    series.epoch_key
                ]
        return grouped

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The latest values and this process's partially reduced epoch values, as plain
        values (a ``torchmetrics.Metric``'s own state is not kept: it lives in the metric)."""
        series = []
        for key, item in self.series.items():
            if item.metric is not None or not item.on_epoch:
                continue
            item.fold()
            values = [to_float(value) for value in item.values]
            series.append(
                {
                    "key": key,
                    "name": item.name,
                    "on_step": item.on_step,
                    "reduce_fx": item.reduce_fx,
                    "prog_bar": item.prog_bar,
                    "logger": item.logger,
                    "sync_dist": item.sync_dist,
                    "dataloader_idx": item.dataloader_idx,
                    "in_batch": item.in_batch,
                    "values": values,
                    "weights": list(item.weights),
                }
            )
        return {
            "latest": dict(self.latest()),
            "prog_bar": sorted(self._prog_bar),
            "series": series,
            # Step values not yet sent to the loggers (the flush follows on_train_batch_end,
            # where a checkpoint may be written): sent when the run continues.
            "unflushed": {key: to_float(value) for key, value in self._unflushed.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the epoch ``state_dict`` described (call after ``start``)."""
        self._latest.update(state.get("latest", {}))
        self._unflushed.update(state.get("unflushed", {}))
        self._prog_bar.update(state.get("prog_bar", []))
        for saved in state.get("series", []):
            item = _Series(
                saved["name"],
                saved["on_step"],
                True,
                saved["reduce_fx"],
                saved["prog_bar"],
                saved["logger"],
                saved["sync_dist"],
                saved["dataloader_idx"],
                in_batch=saved["in_batch"],
            )
            item.values = [float(value) for value in saved["values"]]
            item.weights = [float(weight) for weight in saved["weights"]]
            self.series[saved["key"]] = item

    def start(self, on_step: bool, on_epoch: bool) -> None:
        """Begin a new run of a loop: forget its series (the latest values stay, and so do
        step values not yet flushed: they go with the next ``log_every_n_steps`` flush)."""
        self.series = {}
        self.default_on_step = on_step
        self.default_on_epoch = on_epoch
        self.dataloader_idx = None
        self.batch = None
        self.open = True

    def close(self) -> None:
        """End the run: from here on ``log`` refuses values (nothing would reduce them)."""
        self.open = False

    def keys(self) -> list[str]:
        """Every key the series of this run write (step and epoch keys, and the plain name)."""
        return [
            key
            for series in self.series.values()
            for key in (series.step_key, series.epoch_key, series.name)
        ]

    def forget(self, keys: list[str]) -> None:
        """Drop values that must not survive (those of the sanity check)."""
        for key in keys:
            self._latest.pop(key, None)
            self._unflushed.pop(key, None)


class _SizedBatch:
    """A batch and its lazily computed size."""

    __slots__ = ("batch", "size")

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.size = float(infer_batch_size(batch))


def nonfinite(values: dict[str, float]) -> list[str]:
    """The names whose value is NaN or infinite."""
    return [key for key, value in values.items() if not math.isfinite(value)]
