"""Data loaders: moving batches to the device and knowing where the epoch stands.

``PreparedDataLoader`` wraps a user's ``DataLoader`` without copying it. It tells the
gradient state how many batches the epoch has (so the last, shorter accumulation window is
normalised by its own size) and marks the last batch.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from ember.accelerator.optim import GradientState
from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.accelerator.optim import _LoaderFrame
    from ember.accelerator.precision import Precision


@dataclasses.dataclass
class DataLoaderConfiguration:
    """How ``Accelerator.prepare`` treats data loaders (the names follow Accelerate).

    Args:
        split_batches: the loader's batch size is the global one, divided over processes.
        dispatch_batches: process 0 reads and sends batches to the others (None: only for
            iterable datasets).
        even_batches: pad the last round so every process gets the same number of batches.
        use_seedable_sampler: shuffle with a sampler seeded from ``data_seed`` and the epoch.
        data_seed: the seed of that sampler.
        non_blocking: copy batches to the device asynchronously (needs pinned memory).
        use_stateful_dataloader: use ``torchdata``'s ``StatefulDataLoader``.
    """

    split_batches: bool = False
    dispatch_batches: bool | None = None
    even_batches: bool = True
    use_seedable_sampler: bool = False
    data_seed: int | None = None
    non_blocking: bool = False
    use_stateful_dataloader: bool = False

    def __post_init__(self) -> None:
        for name in (
            "split_batches",
            "even_batches",
            "use_seedable_sampler",
            "non_blocking",
            "use_stateful_dataloader",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise MisconfigurationError(
                    f"`DataLoaderConfiguration({name}={value!r})` is not supported: use True or "
                    "False."
                )
        if self.dispatch_batches is not None and not isinstance(self.dispatch_batches, bool):
            raise MisconfigurationError(
                f"`DataLoaderConfiguration(dispatch_batches={self.dispatch_batches!r})` is not "
                "supported: use True, False or None."
            )
        seed = self.data_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise MisconfigurationError(
                f"`DataLoaderConfiguration(data_seed={seed!r})` is not supported: use an "
                "integer >= 0, or None."
            )
        if self.use_stateful_dataloader:
            raise MisconfigurationError(
                "`DataLoaderConfiguration(use_stateful_dataloader=True)` needs torchdata's "
                "StatefulDataLoader, which ember does not support yet; leave it False."
            )


def move_to_device(data: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``data`` with every tensor in it on ``device`` (dicts, lists, tuples, namedtuples,
    dataclasses and objects with a ``.to`` method are followed)."""
    if isinstance(data, Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, Mapping):
        return type(data)(  # type: ignore[call-arg]
            {key: move_to_device(value, device, non_blocking) for key, value in data.items()}
        )
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(move_to_device(value, device, non_blocking) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(move_to_device(value, device, non_blocking) for value in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {
            field.name: move_to_device(getattr(data, field.name), device, non_blocking)
            for field in dataclasses.fields(data)
            if field.init
        }
        return dataclasses.replace(data, **changes)
    to = getattr(data, "to", None)
    if callable(to):
        return to(device)
    return data


def batch_transfer(
    device: torch.device, non_blocking: bool, convert_input: Callable[[Any], Any] | None
) -> Callable[[Any], Any] | None:
    """The function applied to each batch, or None when batches need nothing done.

    Loaders yield CPU tensors, so on the CPU without a dtype cast the batch passes untouched:
    no per-batch walk over the batch at all.
    """
    if device.type == "cpu":
        return convert_input
    if convert_input is None:
        return partial(move_to_device, device=device, non_blocking=non_blocking)
    convert = convert_input

    def transfer(batch: Any) -> Any:
        return convert(move_to_device(batch, device, non_blocking))

    return transfer


class PreparedDataLoader:
    """A data loader whose batches arrive on the device, with the epoch's length known.

    Args:
        loader: the user's loader (any iterable of batches; ``DataLoader`` usually).
        gradient_state: told where each epoch begins and when the last batch comes.
        transfer: applied to each batch (device move, dtype cast), or None.
        max_batches: stop the epoch after this many batches (the Trainer's ``limit_*``).
    """

    def __init__(
        self,
        loader: Any,
        gradient_state: GradientState | None = None,
        transfer: Callable[[Any], Any] | None = None,
        max_batches: int | None = None,
        data_seed: int | None = None,
    ) -> None:
        self.loader = loader
        self.gradient_state = gradient_state
        self.transfer = transfer
        self.max_batches = max_batches
        #: With a seed, a shuffling RandomSampler draws each epoch's order from a generator
        #: seeded with ``data_seed + epoch``: the same order in every run and on every rank.
        self.data_seed = data_seed
        #: The epoch of the next pass; each pass advances it (the Trainer sets it first).
        self.epoch = 0

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    @property
    def batch_size(self) -> int | None:
        return getattr(self.loader, "batch_size", None)

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    def __len__(self) -> int:
        length = len(self.loader)
        return length if self.max_batches is None else min(length, self.max_batches)

    def known_length(self) -> int | None:
        """The number of batches per epoch, or None for a loader without a length."""
        try:
            return len(self)
        except TypeError:
            return self.max_batches

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch of the next pass (its shuffling order)."""
        self.epoch = epoch

    def _begin_pass(self) -> None:
        # Tell the samplers which epoch comes, then count it as started.
        epoch = self.epoch
        self.epoch += 1
        sampler = self.sampler
        if self.data_seed is not None and isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(self.data_seed + epoch)
        for holder in (sampler, getattr(self.loader, "batch_sampler", None)):
            set_epoch = getattr(holder, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def exact_length(self) -> int | None:
        """The number of batches a pass yields, when it is certain (None otherwise).

        Certain: a ``DataLoader`` over a map-style dataset, or a list or tuple of batches. An
        ``IterableDataset``'s length is only an estimate, and so may be any other object's.
        """
        loader = self.loader
        certain = isinstance(loader, (list, tuple)) or (
            isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)
        )
        return len(self) if certain else None

    def __iter__(self) -> Iterator[Any]:
        self._begin_pass()
        length = self.exact_length()
        state = self.gradient_state if self.gradient_state is not None else _DETACHED
        # The pass is registered now, not at the first batch: an iterator opened before the
        # training loop (a validation iterator kept open) is older than the training pass, so
        # it never takes over the training loop's accumulation windows.
        frame = state.begin_pass(length, source=self)
        batches = self._counted(state, frame, length) if length is not None else None
        if batches is None:
            batches = self._looking_ahead(state, frame)
        # An iterator dropped before its first batch never runs its `finally`: end its pass
        # when it is collected.
        weakref.finalize(batches, state.end_pass, frame)
        return batches

    def _counted(self, state: GradientState, frame: _LoaderFrame, length: int) -> Iterator[Any]:
        """Batches of a loader whose length is exact: the last one is known by its index."""
        transfer = self.transfer
        try:
            if length == 0:
                return
            for index, batch in enumerate(self.loader, start=1):
                last = index >= length
                frame.end_of_dataloader = last
                frame.yielded += 1
                if frame.first_yield < 0:
                    frame.mark_first_yield(state)
                state.signal_pending = True  # a new loop iteration begins
                yield batch if transfer is None else transfer(batch)
                if last:
                    return
        finally:
            state.end_pass(frame)

    def _looking_ahead(self, state: GradientState, frame: _LoaderFrame) -> Iterator[Any]:
        """Batches of a loader of unknown length: reading one batch ahead finds the last."""
        transfer = self.transfer
        limit = self.max_batches
        try:
            if limit == 0:
                return
            iterator = iter(self.loader)
            try:
                current = next(iterator)
            except StopIteration:
                return
            index = 0
            while True:
                index += 1
                if limit is not None and index >= limit:
                    following, last = None, True
                else:
                    try:
                        following, last = next(iterator), False
                    except StopIteration:
                        following, last = None, True
                frame.end_of_dataloader = last
                frame.yielded += 1
                if frame.first_yield < 0:
                    frame.mark_first_yield(state)
                state.signal_pending = True
                yield current if transfer is None else transfer(current)
                if last:
                    return
                current = following
        finally:
            state.end_pass(frame)


def prepare_loader(
    loader: Any,
    gradient_state: GradientState,
    device: torch.device | None,
    precision: Precision,
    config: DataLoaderConfiguration,
    max_batches: int | None = None,
) -> PreparedDataLoader:
    """``Accelerator.prepare_data_loader``: ``loader`` wrapped so batches arrive on ``device``
    (None: left where they are) in the precision's input dtype, with epochs tracked."""
    if isinstance(loader, PreparedDataLoader):
        loader = loader.loader
    convert = precision.convert_input if precision.casts_inputs else None
    transfer = (
        batch_transfer(device, config.non_blocking, convert) if device is not None else convert
    )
    data_seed = None
    if config.use_seedable_sampler:
        # Without data_seed, one draw from torch's generator: seed_everything decides it.
        data_seed = config.data_seed
        if data_seed is None:
            data_seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return PreparedDataLoader(loader, gradient_state, transfer, max_batches, data_seed=data_seed)


#: The gradient state of a loader prepared without an accelerator: it only tracks its passes.
_DETACHED = GradientState()


def skip_first_batches(loader: Any, num_batches: int) -> Any:
    """A loader that yields what ``loader`` yields, minus its first ``num_batches`` batches."""
    return _SkipLoader(loader, num_batches)


class _SkipLoader:
    def __init__(self, loader: Any, num_batches: int) -> None:
        self.loader = loader
        self.num_batches = num_batches

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.num_batches)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        for _ in range(self.num_batches):
            try:
                next(iterator)
            except StopIteration:
                return iter(())
        return iterator


def infer_batch_size(batch: Any) -> int:
    """The size of dim 0 of the first tensor found in ``batch`` (1 when there is none)."""
    size = _first_size(batch)
    return 1 if size is None else size


def _first_size(value: Any) -> int | None:
    # None (not 1) when a nested container holds no tensor, so the search goes on past it:
    # a batch like ``(["name", ...], tensor)`` gets the tensor's size.
    if isinstance(value, Tensor):
        return value.shape[0] if value.ndim > 0 else 1
    if isinstance(value, Mapping):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return None
    for item in value:
        size = _first_size(item)
        if size is not None:
            return size
    return None


def is_data_loader(obj: Any) -> bool:
    """Whether ``prepare`` should treat ``obj`` as a data loader."""
    return isinstance(obj, (DataLoader, PreparedDataLoader))
