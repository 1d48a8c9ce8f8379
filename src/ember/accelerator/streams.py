"""Sharding a stream of batches (an ``IterableDataset``'s loader, or any iterable of
batches) over processes, in rounds.

A round is N batches (one with ``split_batches``): one process with batch N x B would see them
as one global batch, and rank r gets slice r of it. With ``dispatch`` rank 0 reads the stream
and broadcasts each round; without, every rank reads it all and keeps its share. The ranks
agree on the end of the data every round, so a stream that ends unevenly cannot leave one
rank waiting. ``even_batches`` pads a short last round with the epoch's first samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch

from ember.accelerator.nested import concatenate, infer_batch_size, slice_tensors
from ember.accelerator.sharding import BatchPlace, Collectives, split_size
from ember.errors import MisconfigurationError


class StreamSharding:
    """This process's share of a stream of batches, read in rounds.

    Args:
        loader: the user's loader over an ``IterableDataset`` (or any iterable of batches).
        collectives: rank, world size, the broadcast (dispatch) and the agreement on the end.
        split_batches: each batch is a global one, sliced over the ranks; else a round is N
            batches, one per rank.
        even_batches: pad the last round (from the epoch's first round).
        dispatch: rank 0 reads the stream and broadcasts each round; else every rank reads it.
        batch_size: the loader's batch size; None: batches are taken whole, never sliced.
        drop_last: drop a short last round.
    """

    def __init__(
        self,
        loader: Any,
        collectives: Collectives,
        split_batches: bool,
        even_batches: bool,
        dispatch: bool,
        batch_size: int | None,
        drop_last: bool,
    ) -> None:
        self.loader = loader
        self.collectives = collectives
        self.split = split_batches
        self.even = even_batches
        self.dispatch = dispatch
        self.drop_last = drop_last
        world = collectives.world_size
        if split_batches and batch_size is None:
            raise MisconfigurationError(
                "`split_batches=True` needs the loader's batch size, and this loader has none "
                f"({type(loader).__name__}). Use a DataLoader with a batch_size, or "
                "split_batches=False."
            )
        self.per_rank: int | None = (
            split_size(batch_size, world, "the loader's batch_size")
            if split_batches and batch_size is not None
            else batch_size
        )

    def __len__(self) -> int:
        """This rank's batches per pass, from the loader's length (an estimate for an
        ``IterableDataset``); ``TypeError`` when it has none."""
        count = len(self.loader)
        if self.split:
            return count
        world, rank = self.collectives.world_size, self.collectives.rank
        if self.drop_last:
            return count // world
        return math.ceil(count / world) if self.even else len(range(rank, count, world))

    def open(
        self, skip: int, limit: int | None
    ) -> tuple[Iterator[tuple[BatchPlace, Any]], int | None]:
        """Start a pass: this rank's ``(place, batch)`` pairs (the length is not known).
        ``skip`` and ``limit`` count rounds, the same on every rank."""
        return self._shares(skip, limit), None

    def _shares(self, skip: int, limit: int | None) -> Iterator[tuple[BatchPlace, Any]]:
        rank = self.collectives.rank
        rounds = self._received_rounds() if self.dispatch else self._agreed_rounds()
        end = None if limit is None else skip + limit
        for pieces, places in islice(rounds, skip, end):
            if pieces[rank] is not None:
                yield places[rank], pieces[rank]

    def _received_rounds(self) -> Iterator[tuple[list[Any], list[BatchPlace]]]:
        # Rank 0 reads; every round (and the end, as None) is broadcast to all.
        local = self._rounds() if self.collectives.rank == 0 else None
        while True:
            message = next(local, None) if local is not None else None
            message = self.collectives.broadcast_object(message)
            if message is None:
                return
            yield message

    def _agreed_rounds(self) -> Iterator[tuple[list[Any], list[BatchPlace]]]:
        # Every rank reads; the pass ends for all as soon as one rank's stream has ended.
        local = self._rounds()
        while True:
            message = next(local, None)
            flags = self.collectives.all_gather(
                torch.tensor([message is not None], dtype=torch.long)
            )
            if message is None or int(flags.min().item()) == 0:
                return
            yield message

    def _rounds(self) -> Iterator[tuple[list[Any], list[BatchPlace]]]:
        """The rounds of the stream as this rank reads them: each rank's piece (None: no
        batch) and place."""
        world = self.collectives.world_size
        per_round = 1 if self.split else world
        iterator = iter(self.loader)
        first: list[Any] | None = None
        start = 0
        while True:
            batches = list(islice(iterator, per_round))
            if not batches:
                return
            if first is None:
                first = batches
            pieces, places, real = self._round(batches, first, start)
            if pieces is None:
                return
            yield pieces, places
            start += real
            if len(batches) < per_round:
                return

    def _round(
        self, batches: list[Any], first: list[Any], start: int
    ) -> tuple[list[Any] | None, list[BatchPlace], int]:
        world = self.collectives.world_size
        per_round = 1 if self.split else world
        b = self.per_rank
        if b is None:  # whole batches, never sliced
            sizes = [infer_batch_size(batch) for batch in batches]
            if len(batches) < per_round and self.drop_last:
                return None, [], 0
            pieces: list[Any] = list(batches)
            places = []
            position = start
            for size in sizes:
                places.append(BatchPlace(position, size))
                position += size
            if len(batches) < world and self.even:
                fills = [first[index % len(first)] for index in range(world - len(batches))]
                padding = sum(infer_batch_size(fill) for fill in fills)
                pieces += fills
                places = [BatchPlace(p.start, p.size, 0, padding) for p in places]
                places += [
                    BatchPlace(position, 0, infer_batch_size(fill), padding) for fill in fills
                ]
            pieces += [None] * (world - len(pieces))
            places += [BatchPlace(position, 0)] * (world - len(places))
            return pieces, places, sum(sizes)
        full = world * b
        sizes = [infer_batch_size(batch) for batch in batches]
        real = sum(sizes)
        if len(batches) == per_round and real == full:
            if not self.split and all(size == b for size in sizes):
                pieces = list(batches)  # a full round: each rank's batch as it came
            else:
                whole = concatenate(batches)
                pieces = [slice_tensors(whole, rank * b, (rank + 1) * b) for rank in range(world)]
            return pieces, [BatchPlace(start + rank * b, b) for rank in range(world)], real
        if self.drop_last:
            return None, [], 0
        whole = concatenate(batches)
        padding = full - real if self.even else 0
        if padding:
            source = concatenate(first)
            copies = math.ceil(padding / max(1, infer_batch_size(source)))
            filler = slice_tensors(concatenate([source] * copies), 0, padding)
            whole = concatenate([whole, filler])
        pieces, places = [], []
        for rank in range(world):
            size = max(0, min(real - rank * b, b))
            if size == 0 and not padding:
                pieces.append(None)
                places.append(BatchPlace(start + real, 0))
                continue
            pieces.append(slice_tensors(whole, rank * b, rank * b + (b if padding else size)))
            places.append(
                BatchPlace(start + min(rank * b, real), size, (b - size) if padding else 0, padding)
            )
        return pieces, places, real
