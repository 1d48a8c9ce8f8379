"""``find_executable_batch_size``: retry a function with half the batch size on out-of-memory
(Accelerate's decorator of the same name)."""

from __future__ import annotations

import functools
import gc
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ember.errors import MisconfigurationError

ResultT = TypeVar("ResultT")

#: Messages of the RuntimeErrors that mean "out of memory" (allocators of CUDA, MPS and the
#: CPU; cuDNN's "not supported" is how some CUDA allocations fail).
_OUT_OF_MEMORY_MESSAGES = (
    "out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator running out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if isinstance(error, RuntimeError) and len(error.args) == 1:
        message = str(error.args[0])
        return any(part in message for part in _OUT_OF_MEMORY_MESSAGES)
    return False


def free_memory() -> None:
    """Collect garbage and hand cached device memory back (between two tries)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


def find_executable_batch_size(
    function: Callable[..., ResultT] | None = None, starting_batch_size: int = 128
) -> Any:
    """Call ``function(batch_size, *args, **kwargs)`` with ``starting_batch_size``, and again
    with half of it each time it runs out of memory (``torch.OutOfMemoryError``, or a
    RuntimeError saying "out of memory" from the CUDA, MPS or CPU allocator), freeing memory
    between tries. Any other exception passes through.

    Use it as a decorator; the wrapped function is called without the batch size.

    Examples:
        A function that runs out of memory above 16 samples gets 64, 32, then 16:

        >>> import torch, ember
        >>> @ember.find_executable_batch_size(starting_batch_size=64)
        ... def train(batch_size):
        ...     print("trying", batch_size)
        ...     if batch_size > 16:
        ...         raise torch.OutOfMemoryError("CUDA out of memory")
        ...     return batch_size
        >>> train()
        trying 64
        trying 32
        trying 16
        16

    Raises:
        RuntimeError: the batch size reached 0 (even a batch of 1 does not fit).
        TypeError: the wrapped function was called with a batch size.
    """
    if function is None:
        return functools.partial(
            find_executable_batch_size, starting_batch_size=starting_batch_size
        )
    if (
        not isinstance(starting_batch_size, int)
        or isinstance(starting_batch_size, bool)
        or starting_batch_size < 1
    ):
        raise MisconfigurationError(
            f"`starting_batch_size={starting_batch_size!r}` is not supported: use an integer >= 1."
        )
    name = getattr(function, "__name__", repr(function))

    @functools.wraps(function)
    def with_batch_size(*args: Any, **kwargs: Any) -> ResultT:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            parameters = None
        takes_varargs = parameters is None or any(
            p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values()
        )
        if not takes_varargs and parameters is not None and len(args) + 1 > len(parameters):
            raise TypeError(
                f"{name}() got {len(args)} positional argument(s) besides the batch size, which "
                f"find_executable_batch_size passes itself as the first argument: call "
                f"{name}() without the batch size."
            )
        batch_size = starting_batch_size
        while True:
            if batch_size == 0:
                raise RuntimeError(
                    f"find_executable_batch_size: {name}() ran out of memory at every batch "
                    f"size from {starting_batch_size} down to 1 (no executable batch size "
                    "found, reached zero). Make the model or the inputs smaller, or use a "
                    "device with more memory."
                )
            try:
                return function(batch_size, *args, **kwargs)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
            # Outside the `except`: the traceback (and the tensors its frames hold) is gone.
            free_memory()
            batch_size //= 2

    return with_batch_size
