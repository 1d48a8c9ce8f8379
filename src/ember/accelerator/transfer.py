"""What ``prepare_loader`` is told, and what it does to every batch.

``DataLoaderConfiguration`` holds the settings of ``Accelerator.prepare`` for data loaders
(sharding, even batches, the seedable sampler, asynchronous copies). ``move_to_device`` and
``batch_transfer`` move a batch (any nesting of tensors) to the device; the prepared loader
(``ember.accelerator.data``) applies the function ``batch_transfer`` returns to each batch.
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
