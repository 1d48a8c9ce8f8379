"""What ``Accelerator`` does across processes: gather, reduce, pad, share out, take turns.

Each function takes the strategy it works through (its process group and collectives);
the ``Accelerator`` methods of the same names delegate here. Tensors may be nested in dicts,
lists and tuples (``ember.accelerator.nested``). With one process each is an identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ember.accelerator import distributed
from ember.accelerator.data import duplicates_in_last_batch
from ember.accelerator.nested import apply_to_tensors, contains_tensor, pad_tensor, share
from ember.accelerator.optim import GradientState
from ember.accelerator.strategies import Strategy
from ember.errors import MisconfigurationError

REDUCTIONS = ("sum", "mean", "min", "max")


def gather(strategy: Strategy, tensor: Any) -> Any:
    """Every process's tensors concatenated on dim 0."""
    return apply_to_tensors(tensor, strategy.all_gather)


def gather_for_metrics(
    strategy: Strategy, gradient_state: GradientState, obj: Any, *, use_gather_object: bool
) -> Any:
    """``gather``, minus the duplicates that even batching added to the last round of the
    newest sharded pass of ``gradient_state``; non-tensors (or all, with
    ``use_gather_object``) go through ``all_gather_object``, lists concatenated."""
    if strategy.world_size == 1:
        return obj
    duplicates = duplicates_in_last_batch(gradient_state)
    if use_gather_object or not contains_tensor(obj):
        parts = distributed.all_gather_object(obj)
        if all(isinstance(part, (list, tuple)) for part in parts):
            gathered: Any = [item for part in parts for item in part]
            return gathered[: len(gathered) - duplicates] if duplicates else gathered
        return parts
    gathered = gather(strategy, obj)
    if not duplicates:
        return gathered
    return apply_to_tensors(gathered, lambda tensor: tensor[: max(0, tensor.shape[0] - duplicates)])


def reduce(strategy: Strategy, tensor: Any, reduction: str) -> Any:
    """Tensors reduced over processes with one of ``REDUCTIONS``."""
    if reduction not in REDUCTIONS:
        raise MisconfigurationError(
            f"`reduction={reduction!r}` is not supported. Accepted values: 'sum', 'mean', "
            "'min', 'max'."
        )
    return apply_to_tensors(tensor, lambda t: strategy.all_reduce(t, reduction))


def pad_across_processes(
    strategy: Strategy, tensor: Any, dim: int, pad_index: int, *, pad_first: bool
) -> Any:
    """Tensors padded along ``dim`` to the largest size over processes (tensors without
    ``dim`` are left alone)."""
    if strategy.world_size == 1:
        return tensor

    def pad(value: Tensor) -> Tensor:
        axis = dim if dim >= 0 else value.ndim + dim
        if not 0 <= axis < value.ndim:
            return value
        size = torch.tensor([value.shape[axis]], device=value.device)
        largest = int(distributed.all_gather(size).max().item())
        return pad_tensor(value, axis, largest, pad_index, pad_first)

    return apply_to_tensors(tensor, pad)


@contextmanager
def main_process_first(strategy: Strategy) -> Iterator[None]:
    """The block runs on the main process first, then on the others."""
    is_main_process = strategy.global_rank == 0
    if not is_main_process:
        strategy.barrier()
    yield
    if is_main_process:
        strategy.barrier()


@contextmanager
def split_between_processes(strategy: Strategy, inputs: Any) -> Iterator[Any]:
    """This process's contiguous share of ``inputs``."""
    yield share(inputs, strategy.global_rank, strategy.world_size)
