"""Sharding a loader over processes without changing the global order.

One process with batch N x B walks each epoch's order in global batches of N x B samples.
N processes walk the same order: at step k, process r holds slice r (B samples) of global
batch k, so gathering the processes' batches in rank order gives back global batch k.

- Map-style datasets (``IndexSharding``): each epoch, rank 0 iterates the user's own sampler
  (or batch sampler) exactly as one process would, and broadcasts the order; every rank
  plans its share of it (``plan_split``, ``plan_whole``) and loads it with a ``DataLoader``
  built from the user's (same ``collate_fn``, workers, pinning, generator...).
- Iterable datasets (``StreamSharding``, in ``streams.py``): the stream is read in rounds of N batches (one
  with ``split_batches``). With ``dispatch`` rank 0 reads and broadcasts each round; without,
  every rank reads the whole stream and keeps its share. Ranks agree on the end of the data
  every round, so an uneven end cannot leave one rank waiting.

``even_batches``: a short last round is padded with samples from the start of the epoch, so
every rank gets the same number of batches of the same size; each batch's ``BatchPlace``
says how many duplicates the round holds (``gather_for_metrics`` drops them).

Ranks, world size and the collectives are parameters (``Collectives``): one process can play
rank r of N with recorded broadcasts, which is how most of this is tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ember.accelerator import distributed
from ember.errors import MisconfigurationError


@dataclass(frozen=True, slots=True)
class BatchPlace:
    """Where one batch of one process sits in its epoch (to put per-batch outputs back in
    order: sort every process's batches by ``start``).

    Attributes:
        start: position, in the epoch's order (the order one process walks), of the batch's
            first sample.
        size: real samples: the batch's first ``size`` samples are positions ``start`` to
            ``start + size - 1``.
        padding: samples after those, repeated from the start of the epoch (even batches).
        round_padding: duplicates at the end of the round's batches gathered over every
            process in rank order (what ``gather_for_metrics`` drops); 0 but in a padded
            last round.
    """

    start: int
    size: int
    padding: int = 0
    round_padding: int = 0


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """The dataset indices of one batch of this process, and its place."""

    indices: list[int]
    place: BatchPlace


class Collectives(Protocol):
    """What sharding needs from the process group; rank 0 is always the source."""

    rank: int
    world_size: int

    def broadcast_tensor(self, tensor: Tensor) -> Tensor: ...

    def broadcast_object(self, obj: Any) -> Any: ...

    def all_gather(self, tensor: Tensor) -> Tensor: ...


class ProcessGroupCollectives:
    """``torch.distributed``'s collectives (``ember.accelerator.distributed``), with tensors on
    ``device`` (the strategy's: nccl needs CUDA tensors)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def broadcast_tensor(self, tensor: Tensor) -> Tensor:
        return distributed.broadcast_tensor(tensor.to(self.device), src=0).cpu()

    def broadcast_object(self, obj: Any) -> Any:
        return distributed.broadcast_object(obj, src=0)

    def all_gather(self, tensor: Tensor) -> Tensor:
        return distributed.all_gather(tensor.to(self.device)).cpu()


# --- plans: pure functions of an epoch's order ------------------------------------------------
def take_cycled(order: list[int], count: int) -> list[int]:
    """The first ``count`` indices of ``order`` repeated as often as needed."""
    if count <= 0 or not order:
        return []
    return (order * math.ceil(count / len(order)))[:count]


def plan_split(
    global_batches: list[list[int]], rank: int, world_size: int, per_rank: int, even: bool
) -> list[PlannedBatch]:
    """Rank ``rank``'s slice ``[rank * per_rank, (rank + 1) * per_rank)`` of every global batch.

    A short last global batch is padded to ``world_size * per_rank`` with the epoch's first
    indices when ``even``; otherwise the ranks past its end get no batch in that round.
    """
    order = [index for batch in global_batches for index in batch]
    full = world_size * per_rank
    low = rank * per_rank
    plan: list[PlannedBatch] = []
    start = 0
    for batch in global_batches:
        real = len(batch)
        if real > full:
            raise MisconfigurationError(
                f"A batch of {real} samples cannot be split over {world_size} processes of "
                f"{per_rank} samples each: make the batch sampler's batches at most {full} long."
            )
        size = max(0, min(real - low, per_rank))
        if real < full and even:
            padded = batch + take_cycled(order, full - real)
            place = BatchPlace(start + min(low, real), size, per_rank - size, full - real)
            plan.append(PlannedBatch(padded[low : low + per_rank], place))
        elif size > 0:
            plan.append(PlannedBatch(batch[low : low + size], BatchPlace(start + low, size)))
        start += real
    return plan


def plan_whole(
    batches: list[list[int]], rank: int, world_size: int, even: bool
) -> list[PlannedBatch]:
    """Whole batches of a batch sampler: rank r takes batches r, r + N, r + 2N...; when
    ``even``, the ranks missing a batch in the last round get the epoch's first indices (as
    many as the first batch holds)."""
    order = [index for batch in batches for index in batch]
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + len(batch))
    nominal = len(batches[0]) if batches else 0
    plan: list[PlannedBatch] = []
    count = len(batches)
    for first in range(0, count, world_size):
        in_round = min(world_size, count - first)
        round_padding = (world_size - in_round) * nominal if even else 0
        index = first + rank
        if index < count:
            place = BatchPlace(offsets[index], len(batches[index]), 0, round_padding)
            plan.append(PlannedBatch(list(batches[index]), place))
        elif even:
            fill = take_cycled(order, (rank - in_round + 1) * nominal)[-nominal:]
            plan.append(PlannedBatch(fill, BatchPlace(len(order), 0, nominal, round_padding)))
    return plan


def split_size(batch_size: int, world_size: int, what: str) -> int:
    """The per-process batch size of ``split_batches=True``: an error unless it divides."""
    if batch_size % world_size:
        raise MisconfigurationError(
            f"`split_batches=True` divides {what} ({batch_size}) over {world_size} "
            f"processes, which does not divide evenly. Use a batch size that is a multiple of "
            f"{world_size}, or split_batches=False."
        )
    return batch_size // world_size


def loading_options(loader: DataLoader) -> dict[str, Any]:
    """How ``loader`` loads its batches (workers, collate, pinning, generator...): the
    keyword arguments that build another ``DataLoader`` over the same dataset that loads the
    same way, whatever order or batching it is given."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": loader.in_order,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return options


# --- map-style datasets -------------------------------------------------------------------------
class _PlannedBatches:
    """The per-rank loader's batch sampler (or sampler): the current pass's plan."""

    def __init__(self, sharding: IndexSharding, single: bool) -> None:
        self.sharding = sharding
        self.single = single  # no automatic batching: yield the one index of each "batch"

    def __iter__(self) -> Iterator[Any]:
        for planned in self.sharding.current_plan():
            yield planned.indices[0] if self.single else planned.indices

    def __len__(self) -> int:
        return self.sharding.planned_length()


class IndexSharding:
    """This process's share of a map-style ``DataLoader``, epoch by epoch.

    Args:
        loader: the user's loader (its sampler or batch sampler gives each epoch's order).
        collectives: rank, world size, and the broadcast of the order from rank 0.
        split_batches: the loader's batch size is the global one.
        even_batches: pad the last round so every rank gets as many batches.
    """

    def __init__(
        self, loader: DataLoader, collectives: Collectives, split_batches: bool, even_batches: bool
    ) -> None:
        self.loader = loader
        self.collectives = collectives
        self.even = even_batches
        self.split = split_batches
        world = collectives.world_size
        # Three shapes of DataLoader: a batch size (a BatchSampler over the sampler), a user
        # batch sampler, or no automatic batching (one sample at a time).
        self.single = loader.batch_sampler is None
        self.from_batch_sampler = loader.batch_size is None and not self.single
        self.per_rank: int | None = None
        if not self.from_batch_sampler:
            batch_size = 1 if self.single else int(loader.batch_size)  # type: ignore[arg-type]
            self.per_rank = (
                split_size(batch_size, world, "the loader's batch_size")
                if split_batches and not self.single
                else batch_size
            )
        elif split_batches:
            size = getattr(loader.batch_sampler, "batch_size", None)
            if not isinstance(size, int):
                raise MisconfigurationError(
                    "`split_batches=True` with a custom batch_sampler needs the sampler to have "
                    f"an integer `batch_size` attribute; {type(loader.batch_sampler).__name__} "
                    "has none. Give it one, or use split_batches=False."
                )
            self.per_rank = split_size(size, world, "the batch sampler's batch_size")
        self._plan: list[PlannedBatch] | None = None
        self._skip = 0
        self._limit: int | None = None
        #: Where in the epoch's order the current pass starts (a resume on another number
        #: of processes), in the unit of ``position_unit``.
        self._start = 0
        self.rank_loader = self._build_rank_loader()

    def _build_rank_loader(self) -> DataLoader:
        loader = self.loader
        planned = _PlannedBatches(self, self.single)
        options = loading_options(loader)
        if self.single:
            return DataLoader(loader.dataset, batch_size=None, sampler=planned, **options)
        return DataLoader(loader.dataset, batch_sampler=planned, **options)

    # --- lengths ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """This rank's batches per epoch (from the sampler's length, before any pass)."""
        world, rank = self.collectives.world_size, self.collectives.rank
        if self.from_batch_sampler and not self.split:
            count = len(self.loader.batch_sampler)  # type: ignore[arg-type]
            return math.ceil(count / world) if self.even else len(range(rank, count, world))
        if self.from_batch_sampler:
            return len(self.loader.batch_sampler)  # type: ignore[arg-type]
        assert self.per_rank is not None
        full_size = self.per_rank * world
        full, rest = divmod(len(self.loader.sampler), full_size)  # type: ignore[arg-type]
        if rest == 0 or self.loader.drop_last:
            return full
        return full + (1 if self.even or rest > rank * self.per_rank else 0)

    def planned_length(self) -> int:
        """Batches of the current pass once planned, else the estimate from ``__len__``."""
        if self._plan is not None:
            return len(self._plan)
        return len(self)

    # --- one pass ---------------------------------------------------------------------------
    # --- the global position (a resume on another number of processes) ---------------------
    @property
    def position_unit(self) -> str:
        """What a global position counts: "batches" of the user's batch sampler, or
        "samples" of the epoch's order."""
        return "batches" if self.from_batch_sampler else "samples"

    def position_after(self, rounds: int, start: int = 0) -> int:
        """The global position (``position_unit``) once every rank has taken ``rounds``
        batches of a pass that began at position ``start``."""
        world = self.collectives.world_size
        if self.from_batch_sampler:
            per_round = 1 if self.per_rank is not None else world
            total = len(self.loader.batch_sampler)  # type: ignore[arg-type]
        else:
            assert self.per_rank is not None
            per_round = self.per_rank * world
            total = len(self.loader.sampler)  # type: ignore[arg-type]
        return min(start + rounds * per_round, total)

    def rounds_before(self, position: int) -> int:
        """How many of this world's rounds the first ``position`` units of the order fill
        (rounded up: the bookkeeping of a pass that starts there)."""
        world = self.collectives.world_size
        if self.from_batch_sampler:
            per_round = 1 if self.per_rank is not None else world
        else:
            assert self.per_rank is not None
            per_round = self.per_rank * world
        return math.ceil(position / per_round)

    def open(
        self, skip: int, limit: int | None, start: int = 0
    ) -> tuple[Iterator[tuple[BatchPlace, Any]], int]:
        """Start a pass: this rank's ``(place, batch)`` pairs and how many there are.
        ``skip``: leave out this rank's first batches; ``start``: begin at this global
        position of the order instead (``position_unit``).

        Every rank must call it (rank 0 broadcasts the order). The loader's iterator is made
        first: it draws its base seed before the sampler draws its order, as in one process.
        """
        self._plan = None
        self._skip, self._limit, self._start = skip, limit, start
        batches = iter(self.rank_loader)
        plan = self.current_plan()
        return zip((planned.place for planned in plan), batches, strict=False), len(plan)

    def current_plan(self) -> list[PlannedBatch]:
        """This rank's batches of the current pass (planned, with the broadcast, on first use)."""
        if self._plan is None:
            plan = self.plan()
            end = None if self._limit is None else self._skip + self._limit
            self._plan = plan[self._skip : end]
        return self._plan

    def plan(self) -> list[PlannedBatch]:
        """This rank's whole share of the epoch's order, which rank 0 draws and broadcasts."""
        collectives = self.collectives
        world, rank = collectives.world_size, collectives.rank
        if self.from_batch_sampler:
            batches = None
            if rank == 0:
                batches = [[int(index) for index in batch] for batch in self.loader.batch_sampler]  # type: ignore[union-attr]
            batches = collectives.broadcast_object(batches)[self._start :]
            if self.per_rank is None:
                return plan_whole(batches, rank, world, self.even)
            return plan_split(batches, rank, world, self.per_rank, self.even)
        order = self._broadcast_order()[self._start :]
        assert self.per_rank is not None
        full_size = self.per_rank * world
        global_batches = [
            order[start : start + full_size] for start in range(0, len(order), full_size)
        ]
        if global_batches and len(global_batches[-1]) < full_size and self.loader.drop_last:
            global_batches.pop()  # drop_last drops the short global batch
        return plan_split(global_batches, rank, world, self.per_rank, self.even)

    def _broadcast_order(self) -> list[int]:
        collectives = self.collectives
        if collectives.rank == 0:
            order = torch.as_tensor(list(self.loader.sampler), dtype=torch.long)
            length = torch.tensor([order.numel()], dtype=torch.long)
        else:
            length = torch.zeros(1, dtype=torch.long)
        length = collectives.broadcast_tensor(length)
        if collectives.rank != 0:
            order = torch.zeros(int(length.item()), dtype=torch.long)
        order = collectives.broadcast_tensor(order.reshape(-1))
        return [int(index) for index in order.tolist()]
