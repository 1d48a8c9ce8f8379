"""Nested data (dicts, lists, tuples of tensors) as the collectives see it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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
