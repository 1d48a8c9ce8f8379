"""Nested data (dicts, lists, tuples of tensors) as the collectives see it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


def apply_to_tensors(data: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """``data`` with ``function`` applied to every tensor in it (dicts, lists, tuples and
    namedtuples are followed; anything else is kept)."""
    if isinstance(data, Tensor):
        return function(data)
    if isinstance(data, Mapping):
        return type(data)({key: apply_to_tensors(value, function) for key, value in data.items()})  # type: ignore[call-arg]
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple: fields are positional
        return type(data)(*(apply_to_tensors(value, function) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(apply_to_tensors(value, function) for value in data)
    return data


def share(inputs: Any, index: int, count: int) -> Any:
    """Process ``index`` of ``count``'s contiguous share of a sequence (or a dict of them);
    the first ``len % count`` processes get one item more."""
    if isinstance(inputs, Mapping):
        return {key: share(value, index, count) for key, value in inputs.items()}
    length = len(inputs)
    per_process, extra = divmod(length, count)
    start = index * per_process + min(index, extra)
    end = start + per_process + (1 if index < extra else 0)
    return inputs[start:end]


def contains_tensor(data: Any) -> bool:
    """Whether a tensor is anywhere in ``data`` (dicts, lists and tuples are followed)."""
    if isinstance(data, Tensor):
        return True
    if isinstance(data, Mapping):
        return any(contains_tensor(value) for value in data.values())
    if isinstance(data, (list, tuple)):
        return any(contains_tensor(value) for value in data)
    return False


def slice_tensors(data: Any, start: int, end: int) -> Any:
    """``data`` with every tensor cut to ``[start:end]`` along dim 0 (a batch's samples);
    anything else is kept as it is."""
    return apply_to_tensors(data, lambda tensor: tensor[start:end])


def concatenate(batches: list[Any]) -> Any:
    """One batch made of ``batches`` (same structure each): tensors concatenated along dim
    0, containers followed, other values taken from the first batch."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches) if len(batches) > 1 else first
    if isinstance(first, Mapping):
        return type(first)(  # type: ignore[call-arg]
            {key: concatenate([batch[key] for batch in batches]) for key in first}
        )
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # namedtuple
        return type(first)(*(concatenate(list(parts)) for parts in zip(*batches, strict=True)))
    if isinstance(first, (list, tuple)):
        return type(first)(concatenate(list(parts)) for parts in zip(*batches, strict=True))
    return first


def pad_tensor(tensor: Tensor, dim: int, size: int, pad_index: int, pad_first: bool) -> Tensor:
    """``tensor`` grown to ``size`` along ``dim`` with ``pad_index`` (before the values when
    ``pad_first``); returned as it is when it is already that large."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    padding = tensor.new_full(shape, pad_index)
    return torch.cat([padding, tensor] if pad_first else [tensor, padding], dim=dim)


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
