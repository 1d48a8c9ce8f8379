"""Epoch values over every process: what ``self.log(..., sync_dist=True)`` and torchmetrics
objects become at the end of an epoch in a run of several processes.

Exact, not a reduction of per-process results: a ``"mean"`` is the sum of value x weight over
every batch of every process divided by the sum of the weights (not a mean of per-process
means), ``"sum"`` / ``"min"`` / ``"max"`` are the global ones, and a process that ran no batch
contributes weight 0 and nothing to a min or max. Evaluation loaders are sharded without
padding, so no sample counts twice.

Per reduction, whatever the number of names: one ``all_gather_object`` of the sorted names
(so every process knows the same list, and a name logged on some processes but not others is
a ``MisconfigurationError`` on every process rather than a hang), then at most one
``all_reduce`` per kind (a stacked tensor of sums, one of minima, one of maxima), then each
torchmetrics object's own ``compute()`` sync, in sorted order on every process, including one
that never updated it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.trainer.logging import MetricStore, _Series


@dataclass(frozen=True, slots=True)
class EpochSync:
    """What the metric stores need from the process group at epoch end.

    Attributes:
        world_size: the number of processes (1: nothing is exchanged).
        all_reduce: ``(tensor, "sum" | "min" | "max") -> tensor`` over every process.
        all_gather_object: every process's object, in rank order.
        module: where a torchmetrics object logged on other processes is found (by its
            name among the module's submodules) on a process that never logged it.
    """

    world_size: int
    all_reduce: Callable[[Tensor, str], Tensor]
    all_gather_object: Callable[[Any], list[Any]]
    module: nn.Module | None = None


class Description(NamedTuple):
    """One synced name as a process describes it to the others (picklable, comparable)."""

    key: str
    name: str
    on_step: bool
    on_epoch: bool
    #: "mean", "sum", "min", "max", or "metric" for a torchmetrics object
    reduce_fx: str
    prog_bar: bool
    logger: bool
    dataloader_idx: int | None
    #: logged inside a batch (a process that ran no batch of that loader may lack it) rather
    #: than in an epoch-level hook, which every process runs
    in_batch: bool
    #: the metric's name among the module's submodules (None: not a submodule, or no metric)
    metric_path: str | None


def synchronize(store: MetricStore, sync: EpochSync) -> dict[str, float]:
    """The epoch value of every synced series of ``store`` over all processes, by series key.

    A process lacking a name that others logged in a batch (it ran none of that loader) gets
    the series added, with weight 0, so every process reports the same values.
    """
    mine = sorted(
        describe(key, series, sync.module)
        for key, series in store.series.items()
        if series.on_epoch
        and (series.sync_dist or series.metric is not None)
        and (series.values or series.metric is not None)
    )
    every: list[list[Description]] = [list(entries) for entries in sync.all_gather_object(mine)]
    union: dict[str, Description] = {}
    for entries in every:
        for description in entries:
            union.setdefault(description.key, description)
    check_agreement(every, union)
    order = sorted(union)
    for key in order:
        if key not in store.series:
            store.adopt(union[key])
    values = _reduce_values(store, [union[key] for key in order], sync)
    for key in order:
        description = union[key]
        if description.reduce_fx == "metric":
            values[key] = _compute_metric(store.series[key], description, sync.module)
    return values


def describe(key: str, series: _Series, module: nn.Module | None) -> Description:
    """How ``series`` (under ``key``) is announced to the other processes."""
    metric_path = None
    if series.metric is not None and module is not None:
        metric_path = next(
            (name for name, child in module.named_modules() if child is series.metric), None
        )
    return Description(
        key=key,
        name=series.name,
        on_step=series.on_step,
        on_epoch=series.on_epoch,
        reduce_fx="metric" if series.metric is not None else series.reduce_fx,
        prog_bar=series.prog_bar,
        logger=series.logger,
        dataloader_idx=series.dataloader_idx,
        in_batch=series.in_batch,
        metric_path=metric_path,
    )


def check_agreement(every: list[list[Description]], union: dict[str, Description]) -> None:
    """Raise on every process (they all see the same ``every``) when a name is missing where
    it must be, or is reduced differently on different processes.

    A name logged in a batch must be on every process that logged any synced name in a batch
    of the same loader; a process that did not ran no batch there (or logged nothing synced)
    and contributes nothing. A name logged in an epoch-level hook must be on every process.
    """
    held = [{description.key: description for description in entries} for entries in every]
    active = [
        {description.dataloader_idx for description in entries if description.in_batch}
        for entries in every
    ]
    missing: list[str] = []
    differing: list[str] = []
    for key in sorted(union):
        holders = [rank for rank, names in enumerate(held) if key in names]
        kinds = {held[rank][key].reduce_fx for rank in holders}
        if len(kinds) > 1:
            by_rank = ", ".join(f"rank {rank}: {held[rank][key].reduce_fx}" for rank in holders)
            differing.append(f"{key!r} ({by_rank})")
        in_batch = all(held[rank][key].in_batch for rank in holders)
        scope = union[key].dataloader_idx
        lacking = [
            rank
            for rank in range(len(every))
            if key not in held[rank] and (not in_batch or scope in active[rank])
        ]
        if lacking:
            missing.append(f"{key!r} on ranks {holders} but not on ranks {lacking}")
        elif union[key].reduce_fx == "metric" and union[key].metric_path is None:
            absent = [rank for rank in range(len(every)) if key not in held[rank]]
            if absent:
                raise MisconfigurationError(
                    f"The torchmetrics metric logged as {key!r} was updated on ranks {holders} "
                    f"only; ranks {absent} ran no batch and must still take part in its sync "
                    "(compute() is a collective), but cannot find it: it is not a submodule of "
                    "the module. Assign it as an attribute of the TrainModule (self.metric = "
                    "...) or in an nn.ModuleDict / nn.ModuleList."
                )
    if differing:
        raise MisconfigurationError(
            "Names logged with sync_dist=True (or as torchmetrics) must be reduced the same way "
            f"on every process, but reduce_fx differs for {'; '.join(differing)}. Pass the same "
            "reduce_fx on every process."
        )
    if missing:
        raise MisconfigurationError(
            "Every process must log the same names with sync_dist=True (or as torchmetrics): "
            "the epoch value is reduced over all of them (a process that ran no batch of a "
            f"loader is excused from the names logged in its batches). Logged {'; '.join(missing)}. "
            "Log these names on every process (e.g. outside the condition that skips them), or "
            "without sync_dist=True to keep per-process values."
        )


def _reduce_values(
    store: MetricStore, descriptions: list[Description], sync: EpochSync
) -> dict[str, float]:
    """The plain (non-metric) series: one all_reduce per kind over a stacked tensor."""
    sums: list[float] = []
    minima: list[float] = []
    maxima: list[float] = []
    places: list[tuple[str, str, int]] = []
    for description in descriptions:
        kind = description.reduce_fx
        if kind == "metric":
            continue
        values, weights = store.series[description.key].host_values()
        empty = values.numel() == 0
        if kind == "mean":
            places.append((description.key, kind, len(sums)))
            sums += [float((values * weights).sum()), float(weights.sum())]
        elif kind == "sum":
            places.append((description.key, kind, len(sums)))
            sums.append(float(values.sum()))
        elif kind == "min":
            places.append((description.key, kind, len(minima)))
            minima.append(math.inf if empty else float(values.min()))
        else:
            places.append((description.key, kind, len(maxima)))
            maxima.append(-math.inf if empty else float(values.max()))
    # float64 on the way (gloo and nccl both carry it): the sums stay exact to ~1e-16.
    reduced = {
        kind: sync.all_reduce(torch.tensor(numbers, dtype=torch.float64), kind).cpu().tolist()
        for kind, numbers in (("sum", sums), ("min", minima), ("max", maxima))
        if numbers
    }
    values_by_key: dict[str, float] = {}
    for key, kind, index in places:
        if kind == "mean":
            total, weight = reduced["sum"][index], reduced["sum"][index + 1]
            values_by_key[key] = total / weight if weight else math.nan
        else:
            values_by_key[key] = reduced["sum" if kind == "sum" else kind][index]
    return values_by_key


def _compute_metric(series: _Series, description: Description, module: nn.Module | None) -> float:
    """``compute()`` of the series' metric (a collective in torchmetrics), found in the
    module when this process never logged it."""
    metric = series.metric
    if metric is None:
        assert module is not None and description.metric_path is not None, "checked before"
        metric = module.get_submodule(description.metric_path)
        series.metric = metric  # so it is reset with the others
    with warnings.catch_warnings():
        # A process that ran no batch computes without an update: its part is empty.
        warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")
        value = metric.compute()
    return float(value.item()) if isinstance(value, Tensor) else float(value)
