"""What ``prepare_loader`` is told, and what it does to every batch.

``DataLoaderConfiguration`` holds the settings of ``Accelerator.prepare`` for data loaders
(sharding, even batches, the seedable sampler, asynchronous copies). ``move_to_device`` and
``batch_transfer`` move a batch (any nesting of tensors) to the device; the prepared loader
(``ember.accelerator.data``) applies the function ``batch_transfer`` returns to each batch.
``TransferHooks`` carries the Trainer's module's batch-transfer hooks into that function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ember.errors import MisconfigurationError


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

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> import ember
        >>> config = ember.DataLoaderConfiguration(use_seedable_sampler=True, data_seed=7)
        >>> accelerator = ember.Accelerator(cpu=True, dataloader_config=config)
        >>> loader = accelerator.prepare(DataLoader(torch.arange(10), batch_size=5, shuffle=True))
        >>> first = [batch.tolist() for batch in loader]
        >>> again = ember.Accelerator(cpu=True, dataloader_config=config).prepare(
        ...     DataLoader(torch.arange(10), batch_size=5, shuffle=True))
        >>> [batch.tolist() for batch in again] == first  # the same seed, the same order
        True
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


@dataclasses.dataclass(frozen=True)
class TransferHooks:
    """The batch-transfer hooks a ``TrainModule`` overrides (None: left at the default), and
    the index of the loader they serve.

    Per batch: ``before(batch, dataloader_idx)``, then ``to_device(batch, device,
    dataloader_idx)`` (default: ``move_to_device``), then ``after(batch, dataloader_idx)``,
    then the precision's input cast. Each returns the batch to pass on.
    """

    before: Callable[[Any, int], Any] | None = None
    to_device: Callable[[Any, torch.device, int], Any] | None = None
    after: Callable[[Any, int], Any] | None = None
    dataloader_idx: int = 0

    def __bool__(self) -> bool:
        return not (self.before is None and self.to_device is None and self.after is None)


def batch_transfer(
    device: torch.device | None,
    non_blocking: bool,
    convert_input: Callable[[Any], Any] | None,
    hooks: TransferHooks | None = None,
) -> Callable[[Any], Any] | None:
    """The function applied to each batch, or None when batches need nothing done.

    Loaders yield CPU tensors, so on the CPU without a dtype cast the batch passes untouched:
    no per-batch walk over the batch at all. ``device`` None: batches stay where they are.
    ``hooks``: the module's overridden batch-transfer hooks, built into the function once
    (a hook left at its default costs nothing per batch).
    """
    if hooks:
        return _hooked_transfer(device, non_blocking, convert_input, hooks)
    if device is None:
        return convert_input
    if device.type == "cpu":
        return convert_input
    if convert_input is None:
        return partial(move_to_device, device=device, non_blocking=non_blocking)
    convert = convert_input

    def transfer(batch: Any) -> Any:
        return convert(move_to_device(batch, device, non_blocking))

    return transfer


def _hooked_transfer(
    device: torch.device | None,
    non_blocking: bool,
    convert_input: Callable[[Any], Any] | None,
    hooks: TransferHooks,
) -> Callable[[Any], Any]:
    """``batch_transfer`` with the module's hooks: only the overridden ones are called."""
    index = hooks.dataloader_idx
    steps: list[Callable[[Any], Any]] = []
    if hooks.before is not None:
        steps.append(partial(_call_with_index, hooks.before, index))
    if device is not None:
        if hooks.to_device is not None:
            steps.append(partial(_call_to_device, hooks.to_device, device, index))
        elif device.type != "cpu":
            steps.append(partial(move_to_device, device=device, non_blocking=non_blocking))
    if hooks.after is not None:
        steps.append(partial(_call_with_index, hooks.after, index))
    if convert_input is not None:  # after the hooks: what they add is cast too
        steps.append(convert_input)

    def transfer(batch: Any) -> Any:
        for step in steps:
            batch = step(batch)
        return batch

    return transfer


def _call_with_index(hook: Callable[[Any, int], Any], dataloader_idx: int, batch: Any) -> Any:
    return hook(batch, dataloader_idx)


def _call_to_device(
    hook: Callable[[Any, torch.device, int], Any],
    device: torch.device,
    dataloader_idx: int,
    batch: Any,
) -> Any:
    return hook(batch, device, dataloader_idx)
