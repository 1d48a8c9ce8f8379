"""Strategies: where the module lives and how processes share gradients.

Only ``SingleDeviceStrategy`` exists so far; DDP and FSDP implement the same methods.
Nothing outside ``ember.accelerator`` checks which strategy is in use.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ember.accelerator import distributed
from ember.errors import MisconfigurationError, one_of

ACCELERATORS = ("auto", "cpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "fsdp")


class SingleDeviceStrategy:
    """One process, one device: placement only; every collective is the identity."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    # --- process facts -------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return 1

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    # --- module ----------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Place ``module`` on the device (and wrap it, in distributed strategies)."""
        return module.to(self.device)

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        """The user's module inside whatever wrapper ``setup_module`` put around it."""
        compiled = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        return compiled if isinstance(compiled, nn.Module) else module

    def no_sync(self, module: nn.Module) -> AbstractContextManager[Any]:
        """A context in which backward does not exchange gradients."""
        return nullcontext()

    def clip_grad_norm_(
        self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0
    ) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters: Iterable[Tensor], clip_value: float) -> None:
        torch.nn.utils.clip_grad_value_(list(parameters), clip_value)

    # --- collectives -------------------------------------------------------------------------
    def barrier(self) -> None:
        """Wait until every process arrives here."""

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor``, concatenated along dim 0."""
        return tensor

    def all_reduce(self, tensor: Tensor, reduction: str) -> Tensor:
        """``tensor`` reduced over processes with ``reduction`` ("sum", "mean", "min", "max")."""
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as process ``src`` has it."""
        return obj


def pick_device(accelerator: str, index: int = 0) -> torch.device:
    """The device for an accelerator name, with a clear error when it is not present."""
    if accelerator not in ACCELERATORS:
        raise MisconfigurationError(one_of("accelerator", accelerator, ACCELERATORS))
    if accelerator == "auto":
        if torch.cuda.is_available():
            accelerator = "cuda"
        elif torch.backends.mps.is_available():
            accelerator = "mps"
        else:
            accelerator = "cpu"
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise MisconfigurationError(
                "`accelerator='cuda'` was requested but torch sees no CUDA device on this "
                "machine. Use accelerator='cpu' or 'auto'."
            )
        return torch.device("cuda", index)
    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            raise MisconfigurationError(
                "`accelerator='mps'` was requested but MPS is not available here. "
                "Use accelerator='cpu' or 'auto'."
            )
        return torch.device("mps")
    return torch.device("cpu")


def resolve_strategy(strategy: Any, device: torch.device) -> SingleDeviceStrategy:
    """A strategy object for ``strategy`` (a name or an object already built)."""
    if isinstance(strategy, SingleDeviceStrategy):
        return strategy
    if strategy is None or strategy == "auto":
        if distributed.launched_externally():
            raise MisconfigurationError(
                f"This process was started as one of {distributed.world_size()} processes "
                "(WORLD_SIZE is set), but multi-process training (DDP/FSDP) is not available in "
                "this version of ember yet. Run a single process with plain `python script.py`."
            )
        return SingleDeviceStrategy(device)
    if strategy in ("ddp", "fsdp"):
        raise MisconfigurationError(
            f"`strategy={strategy!r}` is not available in this version of ember yet: only "
            "single-process training is. Use strategy='auto'."
        )
    raise MisconfigurationError(one_of("strategy", strategy, STRATEGIES))
