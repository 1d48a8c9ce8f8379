"""Strategies: where the module lives and how processes share gradients.

Three small objects with the same methods: ``SingleDeviceStrategy`` (one process),
``DDPStrategy`` (``DistributedDataParallel``) and ``FSDPStrategy`` (FSDP2,
``torch.distributed.fsdp.fully_shard``; in ``fsdp.py``). Nothing outside ``ember.accelerator``
checks which one is in use: it asks the strategy (``wraps_module``, ``distributed_type``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ember.accelerator import distributed
from ember.errors import MisconfigurationError, one_of

if TYPE_CHECKING:
    from ember.accelerator.precision import Precision

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
STRATEGIES = ("auto", "ddp", "fsdp")


class DistributedType(str, Enum):
    """How the processes share the work (Accelerate's names; ember reports ``NO``,
    ``MULTI_CPU``, ``MULTI_GPU`` and ``FSDP``, never the others).

    It is a ``str`` enum, so it also compares equal to its name.

    Examples:
        >>> import ember
        >>> accelerator = ember.Accelerator(cpu=True)  # one process
        >>> accelerator.distributed_type
        <DistributedType.NO: 'NO'>
        >>> accelerator.distributed_type == ember.DistributedType.NO == "NO"
        True
    """

    NO = "NO"
    MULTI_CPU = "MULTI_CPU"
    MULTI_GPU = "MULTI_GPU"
    MULTI_NPU = "MULTI_NPU"
    MULTI_MLU = "MULTI_MLU"
    MULTI_SDAA = "MULTI_SDAA"
    MULTI_MUSA = "MULTI_MUSA"
    MULTI_XPU = "MULTI_XPU"
    MULTI_HPU = "MULTI_HPU"
    DEEPSPEED = "DEEPSPEED"
    FSDP = "FSDP"
    XLA = "XLA"
    MEGATRON_LM = "MEGATRON_LM"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class AcceleratorState:
    """What an ``Accelerator`` runs on: read-only (``accelerator.state``)."""

    distributed_type: DistributedType
    num_processes: int
    process_index: int
    local_process_index: int
    device: torch.device
    mixed_precision: str
    backend: str | None = None

    def __repr__(self) -> str:
        backend = f"  Backend: {self.backend}" if self.backend else ""
        return (
            f"Distributed environment: {self.distributed_type.value}{backend}\n"
            f"Num processes: {self.num_processes}\n"
            f"Process index: {self.process_index}\n"
            f"Local process index: {self.local_process_index}\n"
            f"Device: {self.device}\n\n"
            f"Mixed precision type: {self.mixed_precision}\n"
        )


class Strategy(Protocol):
    """What the accelerator asks of a strategy: the process facts, joining and leaving the
    process group, placing and wrapping the module, ``no_sync``, clipping and collectives.
    ``SingleDeviceStrategy``, ``DDPStrategy`` and ``FSDPStrategy`` implement it; the rest of
    ember only ever talks to this."""

    wraps_module: bool
    evaluates_through_wrapper: bool
    requested_device: torch.device | None
    device: torch.device

    @property
    def world_size(self) -> int: ...
    @property
    def global_rank(self) -> int: ...
    @property
    def local_rank(self) -> int: ...
    @property
    def distributed_type(self) -> DistributedType: ...
    @property
    def backend(self) -> str | None: ...
    @property
    def pads_evaluation(self) -> bool: ...
    def setup_environment(self, device: torch.device) -> None: ...
    def setup_precision(self, precision: Precision) -> None: ...
    def setup_module(self, module: nn.Module) -> nn.Module: ...
    def update_optimizer(self, optimizer: Optimizer) -> None: ...
    def unwrap_module(self, module: nn.Module) -> nn.Module: ...
    def no_sync(self, module: nn.Module) -> AbstractContextManager[Any]: ...
    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]: ...
    def full_optimizer_state_dict(self, module: nn.Module, optimizer: Any) -> dict[str, Any]: ...
    def load_full_state_dict(self, module: nn.Module, state_dict: dict[str, Tensor]) -> None: ...
    def load_full_optimizer_state_dict(
        self, module: nn.Module, optimizer: Any, state: dict[str, Any]
    ) -> None: ...
    def clip_grad_norm_(
        self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0
    ) -> Tensor: ...
    def clip_grad_value_(self, parameters: Iterable[Tensor], clip_value: float) -> None: ...
    def barrier(self) -> None: ...
    def all_gather(self, tensor: Tensor) -> Tensor: ...
    def all_reduce(self, tensor: Tensor, reduction: str) -> Tensor: ...
    def broadcast(self, obj: Any, src: int = 0) -> Any: ...
    def teardown(self) -> None: ...


class StepDispatcher(nn.Module):
    """Makes a module's named method (``training_step``, ...) its ``forward``, so a strategy
    whose wrapper needs its forward to run (DDP's gradient hooks, FSDP's unsharding) sees the
    Trainer's steps: ``dispatcher("training_step", batch, batch_idx)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, step_name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, step_name)(*args, **kwargs)


class SingleDeviceStrategy:
    """One process, one device: placement only; every collective is the identity."""

    #: Whether ``setup_module`` puts a wrapper (DDP) around the module, whose ``forward``
    #: must run for the strategy to work: the Trainer then calls its steps through it.
    wraps_module = False
    #: Whether evaluation steps must run through the wrapper too (FSDP: every forward gathers
    #: the weights). DDP evaluates on the bare module: no collective per batch, so ranks may
    #: run different numbers of evaluation batches.
    evaluates_through_wrapper = False

    def __init__(self, device: torch.device | None = None) -> None:
        #: The device asked for (the Trainer's ``accelerator``/``devices``); None lets the
        #: accelerator choose (CUDA for this process's local rank, then MPS, then CPU).
        self.requested_device = device
        #: This process's device, decided by ``setup_environment``.
        self.device = device if device is not None else torch.device("cpu")

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

    @property
    def distributed_type(self) -> DistributedType:
        return DistributedType.NO

    @property
    def pads_evaluation(self) -> bool:
        """Whether evaluation loaders must give every process as many batches (padded): FSDP,
        where every forward is a collective, in a run of several processes."""
        return False

    @property
    def backend(self) -> str | None:
        """The process group's backend ("gloo", "nccl"), None for one process."""
        return None

    def setup_environment(self, device: torch.device) -> None:
        """Take ``device`` as this process's device and join the process group (if any)."""
        self.device = device

    def setup_precision(self, precision: Precision) -> None:
        """Learn the accelerator's precision (FSDP derives its mixed-precision policy)."""

    # --- module ----------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Place ``module`` on the device (and wrap it, in distributed strategies)."""
        return module.to(self.device)

    def update_optimizer(self, optimizer: Optimizer) -> None:
        """Point ``optimizer`` at the parameters that ``setup_module`` put in place of the
        ones it was built over (FSDP's sharded parameters); nothing elsewhere."""

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        """The user's module inside whatever wrapper ``setup_module`` put around it (and the
        Trainer's ``StepDispatcher``)."""
        compiled = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        module = compiled if isinstance(compiled, nn.Module) else module
        return module.module if isinstance(module, StepDispatcher) else module

    def no_sync(self, module: nn.Module) -> AbstractContextManager[Any]:
        """A context in which backward does not exchange gradients."""
        return nullcontext()

    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        """The module's full weights: on every process here and under DDP; under FSDP
        consolidated on global rank 0 (CPU), an empty dict on the others."""
        return self.unwrap_module(module).state_dict()

    def full_optimizer_state_dict(self, module: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The optimizer's full state (under FSDP: gathered on global rank 0, keyed by
        parameter names; an empty dict on the others)."""
        return dict(getattr(optimizer, "optimizer", optimizer).state_dict())

    def load_full_state_dict(self, module: nn.Module, state_dict: dict[str, Tensor]) -> None:
        """Load full weights as ``full_state_dict`` gives them."""
        self.unwrap_module(module).load_state_dict(state_dict)

    def load_full_optimizer_state_dict(
        self, module: nn.Module, optimizer: Any, state: dict[str, Any]
    ) -> None:
        """Load an optimizer state as ``full_optimizer_state_dict`` gives it."""
        getattr(optimizer, "optimizer", optimizer).load_state_dict(state)

    def clip_grad_norm_(
        self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0
    ) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters: Iterable[Tensor], clip_value: float) -> None:
        torch.nn.utils.clip_grad_value_(list(parameters), clip_value)

    # --- collectives -------------------------------------------------------------------------
    def barrier(self) -> None:
        """Wait until every process arrives here."""
        distributed.barrier()

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor``, concatenated along dim 0."""
        return distributed.all_gather(tensor)

    def all_reduce(self, tensor: Tensor, reduction: str) -> Tensor:
        """``tensor`` reduced over processes with ``reduction`` ("sum", "mean", "min", "max")."""
        return distributed.all_reduce(tensor, reduction)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as process ``src`` has it (tensors keep their device)."""
        if isinstance(obj, Tensor):
            return distributed.broadcast_tensor(obj, src)
        return distributed.broadcast_object(obj, src)

    def teardown(self) -> None:
        """Leave the process group this strategy joined."""


class DDPStrategy(SingleDeviceStrategy):
    """``DistributedDataParallel`` over a process group (gloo on CPU, nccl on CUDA).

    Args:
        find_unused_parameters: let DDP tolerate parameters that get no gradient in a step.
        static_graph: the graph is the same every step (lets DDP optimise).
        timeout: how long a collective may wait for the other processes before failing
            (``EMBER_COLLECTIVE_TIMEOUT``, in seconds, overrides it).

    Examples:
        Pass it as the Trainer's (or the Accelerator's) ``strategy`` when the defaults of
        ``strategy="ddp"`` do not fit, and start the processes with ``ember launch`` (or
        ``devices=N`` from plain ``python``):

        ```python
        from datetime import timedelta

        import ember

        strategy = ember.DDPStrategy(find_unused_parameters=True, timeout=timedelta(minutes=5))
        trainer = ember.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3)
        trainer.fit(module, train_loader)  # two processes, each on half of the batches
        ```
    """

    wraps_module = True

    def __init__(
        self,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        timeout: timedelta = distributed.DEFAULT_TIMEOUT,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(device)
        _check_flag("DDPStrategy", "find_unused_parameters", find_unused_parameters)
        _check_flag("DDPStrategy", "static_graph", static_graph)
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        self.timeout = _check_timeout("DDPStrategy", timeout)

    @property
    def world_size(self) -> int:
        return distributed.world_size()

    @property
    def global_rank(self) -> int:
        return distributed.global_rank()

    @property
    def local_rank(self) -> int:
        return distributed.local_rank()

    @property
    def distributed_type(self) -> DistributedType:
        if self.world_size == 1:
            return DistributedType.NO
        return (
            DistributedType.MULTI_GPU if self.device.type == "cuda" else DistributedType.MULTI_CPU
        )

    @property
    def backend(self) -> str | None:
        if not distributed.is_initialized():
            return None
        return str(torch.distributed.get_backend())

    def setup_environment(self, device: torch.device) -> None:
        self.device = device
        distributed.init_process_group(device, distributed.collective_timeout(self.timeout))

    def setup_module(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.world_size == 1:
            return module  # one process: nothing to synchronise
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
            static_graph=self.static_graph,
        )

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        module = super().unwrap_module(module)
        inner = getattr(module, "module", None)
        if isinstance(module, torch.nn.parallel.DistributedDataParallel) and inner is not None:
            return super().unwrap_module(inner)
        return module

    def no_sync(self, module: nn.Module) -> AbstractContextManager[Any]:
        no_sync = getattr(module, "no_sync", None)
        if isinstance(module, torch.nn.parallel.DistributedDataParallel) and no_sync is not None:
            return no_sync()
        return nullcontext()

    def teardown(self) -> None:
        distributed.destroy_process_group()


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
    if accelerator in ("cuda", "gpu"):  # "gpu": Lightning's name for CUDA
        if not torch.cuda.is_available():
            raise MisconfigurationError(
                f"`accelerator={accelerator!r}` was requested but torch sees no CUDA device on "
                "this machine. Use accelerator='cpu' or 'auto'."
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


def resolve_strategy(strategy: Any) -> Strategy:
    """A strategy object for ``strategy``: a name or an object already built.

    "auto" (or None) takes ``EMBER_STRATEGY`` (which ``ember launch`` exports from its flag or
    the ``ember config`` file), then DDP when a launcher started several processes, else one
    device.
    """
    if isinstance(strategy, SingleDeviceStrategy):
        return strategy
    name = strategy
    argument, given = "strategy", strategy
    if strategy is None or strategy == "auto":
        name = os.environ.get("EMBER_STRATEGY") or "auto"
        argument, given = "EMBER_STRATEGY", name
        name = {"no": "auto", "NO": "auto"}.get(name, name)
        if name == "auto":
            name = "ddp" if distributed.launched_externally() else "single"
    if name == "single":
        return SingleDeviceStrategy()
    if name == "ddp":
        return DDPStrategy()
    if name == "fsdp":
        from ember.accelerator.fsdp import FSDPStrategy

        return FSDPStrategy()
    accepted = STRATEGIES if argument == "strategy" else ("no", *STRATEGIES)
    raise MisconfigurationError(one_of(argument, given, accepted))


def _check_flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise MisconfigurationError(
            f"`{owner}({name}={value!r})` is not supported: use True or False."
        )


def _check_timeout(owner: str, value: Any) -> timedelta:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return timedelta(seconds=value)
    if not isinstance(value, timedelta) or value.total_seconds() <= 0:
        raise MisconfigurationError(
            f"`{owner}(timeout={value!r})` is not supported: use a datetime.timedelta (or a "
            "number of seconds) > 0."
        )
    return value
