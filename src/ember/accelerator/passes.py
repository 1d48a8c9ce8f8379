"""Where a prepared loader's passes stand, and replaying one (resuming from a checkpoint).

A pass of a map-style loader draws its order (the sampler's permutation) and its workers'
seeds from random state when it begins. ``capture_pass_rng`` keeps that state; replaying the
pass from it (``restore_pass_rng``, then drawing the order at once through a one-process
``IndexSharding``) gives the same order, and the batches already consumed are left out by
index, without loading them. Other iterables replay by reading and dropping (``SkipLoader``).
``PassState`` is shared by a prepared loader and its skipping copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset

if TYPE_CHECKING:
    from ember.accelerator.optim import _LoaderFrame


class PassState:
    """The epoch of a loader's next pass and where the current pass stands, shared by the
    loader and its skipping copies (so a resumed epoch keeps its shuffling order, and the
    pass after it is the next epoch).

    Attributes:
        value: the epoch of the next pass.
        pass_epoch: the epoch of the pass in progress (or last begun); -1 before any.
        pass_rng: the random state the pass began from (``capture_pass_rng``): replaying it
            draws the same order and worker seeds.
        frame: the pass's frame (how many batches it yielded); None before any pass.
        pass_skip: batches the pass left out at its start, by index (a resumed pass).
        pass_start: the global position of the epoch's order the pass began at (a pass
            resumed on another number of processes; ``IndexSharding.position_unit``).
        pass_offset: batches counted as done before the pass's first batch (``pass_skip``
            and the rounds ``pass_start`` stands for): the batch index of its first batch.
        replay: set by ``load_state_dict``: the next pass replays that epoch from its saved
            random state and leaves out what was already consumed.
        pending_state: the state ``load_state_dict`` received, while its replay has not
            begun (what ``state_dict`` returns then: nothing has moved).
    """

    __slots__ = (
        "frame",
        "pass_epoch",
        "pass_offset",
        "pass_rng",
        "pass_skip",
        "pass_start",
        "pending_state",
        "replay",
        "value",
    )

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.pass_epoch = -1
        self.pass_rng: dict[str, Any] | None = None
        self.frame: _LoaderFrame | None = None
        self.pass_skip = 0
        self.pass_start = 0
        self.pass_offset = 0
        self.replay: dict[str, Any] | None = None
        self.pending_state: dict[str, Any] | None = None


class SkipLoader:
    def __init__(self, loader: Any, num_batches: int) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self._started: Iterator[Any] | None = None

    @classmethod
    def started(cls, loader: Any, num_batches: int) -> SkipLoader:
        """One whose first pass already read and dropped its first ``num_batches`` (now)."""
        skipper = cls(loader, num_batches)
        skipper._started = iter(skipper)
        return skipper

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.num_batches)

    def __iter__(self) -> Iterator[Any]:
        if self._started is not None:
            iterator, self._started = self._started, None
            return iterator
        iterator = iter(self.loader)
        for _ in range(self.num_batches):
            try:
                next(iterator)
            except StopIteration:
                return iter(())
        return iterator


def has_sampler(loader: Any) -> bool:
    """A ``DataLoader`` over a map-style dataset: its order comes from a sampler."""
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)


class OneProcess:
    """The collectives of a one-process plan (``IndexSharding`` of one rank)."""

    rank = 0
    world_size = 1

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0)


ONE_PROCESS = OneProcess()


def capture_pass_rng(loader: Any) -> dict[str, Any] | None:
    """The random state a pass of ``loader`` draws its order and worker seeds from: torch's
    global generator and the loader's and sampler's own generators (None: not a
    ``DataLoader``: nothing random that ember could replay decides its batches)."""
    if not isinstance(loader, DataLoader):
        return None
    return {"torch": torch.get_rng_state(), **(generator_states(loader) or {})}


def restore_pass_rng(loader: Any, state: dict[str, Any]) -> None:
    """Put back what ``capture_pass_rng`` returned."""
    torch.set_rng_state(state["torch"])
    set_generator_states(loader, state)


def generator_states(loader: Any) -> dict[str, Any] | None:
    """The current states of a ``DataLoader``'s own ``generator`` and of its sampler's
    (None: not a ``DataLoader``). A checkpoint keeps them: a loader given a generator draws
    every epoch's order from it, and it must go on where it was."""
    if not isinstance(loader, DataLoader):
        return None
    sampler_generator = getattr(loader.sampler, "generator", None)
    return {
        "loader": loader.generator.get_state() if loader.generator is not None else None,
        "sampler": (
            sampler_generator.get_state()
            if isinstance(sampler_generator, torch.Generator)
            else None
        ),
    }


def set_generator_states(loader: Any, states: dict[str, Any]) -> None:
    """Put back what ``generator_states`` returned (a generator the loader lacks is skipped)."""
    if states.get("loader") is not None and loader.generator is not None:
        loader.generator.set_state(states["loader"])
    sampler_generator = getattr(getattr(loader, "sampler", None), "generator", None)
    if states.get("sampler") is not None and isinstance(sampler_generator, torch.Generator):
        sampler_generator.set_state(states["sampler"])
