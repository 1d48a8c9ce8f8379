"""``FSDPStrategy``: fully sharded data parallel with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each process holds a 1/N shard of every parameter, gradient and optimizer state. The blocks
(``shard_modules``) are sharded one by one, then the root: a block's full weights exist only
while its forward / backward runs (each forward all-gathers them; backward reduce-scatters
the gradients). Parameters become ``DTensor`` s, so an optimizer built over the module's
parameters before ``prepare`` is pointed at the sharded ones by the accelerator.

The same methods as ``DDPStrategy`` (``strategies.py``); only the wrapping, ``no_sync``,
clipping and the state dicts differ. With one process it is a single device, as DDP is.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ember.accelerator import distributed
from ember.accelerator.strategies import (
    DDPStrategy,
    DistributedType,
    StepDispatcher,
    _check_flag,
    _check_timeout,
)
from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.accelerator.precision import Precision

#: The key prefix a ``StepDispatcher`` root puts before the user's module's names.
_DISPATCHER_PREFIX = "module."


class FSDPStrategy(DDPStrategy):
    """Fully sharded data parallel (FSDP2) over a process group (gloo on CPU, nccl on CUDA).

    Args:
        shard_modules: the blocks sharded one by one before the root: a list of module
            classes or class names, each present in the model. None: the classes named in the
            module's ``_no_split_modules`` when it has one (Hugging Face models), else every
            child of each ``nn.ModuleList``. The root is always sharded last.
        reshard_after_forward: free each block's gathered weights after its forward (and
            gather them again for backward): less memory, one more all-gather per block.
        timeout: how long a collective may wait for the other processes before failing
            (``EMBER_COLLECTIVE_TIMEOUT``, in seconds, overrides it).

    Mixed precision comes from the accelerator's precision: "bf16-mixed" gathers the weights
    in bf16 and reduces gradients in fp32; "16-mixed" likewise in fp16, with the loss scaler
    (its inf check is reduced over every shard, so all processes skip together).

    Examples:
        Shard each transformer block, then the root, over two GPUs in bf16:

        ```python
        import ember

        strategy = ember.FSDPStrategy(shard_modules=["TransformerBlock"])
        trainer = ember.Trainer(
            accelerator="cuda", devices=2, strategy=strategy, precision="bf16-mixed"
        )
        trainer.fit(module, train_loader)
        ```

        ``strategy="fsdp"`` is the same with the defaults. See ``docs/fsdp.md`` for
        checkpoints under FSDP and what runs on CPU.
    """

    wraps_module = True
    evaluates_through_wrapper = True

    def __init__(
        self,
        shard_modules: Sequence[type[nn.Module] | str] | None = None,
        reshard_after_forward: bool = True,
        timeout: timedelta = distributed.DEFAULT_TIMEOUT,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(timeout=_check_timeout("FSDPStrategy", timeout), device=device)
        _check_flag("FSDPStrategy", "reshard_after_forward", reshard_after_forward)
        self.shard_modules = _check_shard_modules(shard_modules)
        self.reshard_after_forward = reshard_after_forward
        #: The accelerator's precision (``setup_precision``): decides the mixed-precision policy.
        self.precision: Precision | None = None
        # Each original parameter -> its sharded replacement (for optimizers built before).
        self._replaced: Any = None

    @property
    def distributed_type(self) -> DistributedType:
        return DistributedType.NO if self.world_size == 1 else DistributedType.FSDP

    @property
    def pads_evaluation(self) -> bool:
        """Every forward is a collective: evaluation loaders must give each process as many
        batches (padded)."""
        return self.world_size > 1

    def setup_precision(self, precision: Precision) -> None:
        self.precision = precision

    # --- module ----------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.world_size == 1:
            return module  # one process: nothing to shard
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.utils.weak import WeakIdKeyDictionary

        if _is_fsdp_module(module):
            return module  # prepared already
        blocks = self.blocks_of(module)
        before = dict(module.named_parameters())
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        options: dict[str, Any] = {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
        }
        policy = self._mixed_precision_policy()
        if policy is not None:
            options["mp_policy"] = policy
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(module, **options)
        after = dict(module.named_parameters())
        replaced = WeakIdKeyDictionary()
        for name, parameter in before.items():
            if name in after and after[name] is not parameter:
                replaced[parameter] = after[name]
        self._replaced = replaced
        return module

    def blocks_of(self, module: nn.Module) -> list[nn.Module]:
        """The submodules sharded before the root, innermost first (see ``shard_modules``)."""
        user = _user_module(module)
        modules = list(user.modules())
        if self.shard_modules is not None:
            wanted = self.shard_modules
            _check_present(wanted, modules, user)
            matched = [
                candidate
                for candidate in modules
                if any(
                    type(candidate).__name__ == want
                    if isinstance(want, str)
                    else type(candidate) is want
                    for want in wanted
                )
            ]
        else:
            no_split = getattr(user, "_no_split_modules", None)
            if no_split:
                names = {str(name) for name in no_split}
                matched = [candidate for candidate in modules if type(candidate).__name__ in names]
            else:
                matched = [
                    child
                    for candidate in modules
                    if isinstance(candidate, nn.ModuleList)
                    for child in candidate
                    # A container has no forward: FSDP's gathering hooks would never run.
                    if not isinstance(child, (nn.ModuleList, nn.ModuleDict))
                ]
        # Innermost first (fully_shard wants a block's sub-blocks done before it); the root last.
        seen: set[int] = set()
        blocks = []
        for candidate in reversed(matched):
            if candidate is module or id(candidate) in seen:
                continue
            seen.add(id(candidate))
            blocks.append(candidate)
        order = {id(candidate): index for index, candidate in enumerate(module.modules())}
        blocks.sort(key=lambda block: -order[id(block)])
        return blocks

    def update_optimizer(self, optimizer: Optimizer) -> None:
        """Point ``optimizer`` (built over the module before it was sharded) at the sharded
        parameters that replaced the originals."""
        replaced = self._replaced
        if not replaced:
            return
        for group in optimizer.param_groups:
            group["params"] = [replaced.get(parameter, parameter) for parameter in group["params"]]
        for old in [key for key in optimizer.state if key in replaced]:
            optimizer.state[replaced[old]] = optimizer.state.pop(old)

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        # fully_shard keeps the module itself (its class gains FSDPModule); the Trainer's
        # StepDispatcher root is taken off.
        return _user_module(super().unwrap_module(module))

    def no_sync(self, module: nn.Module) -> AbstractContextManager[Any]:
        if _is_fsdp_module(module):
            return _without_gradient_sync(module)
        return nullcontext()

    def clip_grad_norm_(
        self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0
    ) -> Tensor:
        # torch's clip_grad_norm_ computes the norm of sharded (DTensor) gradients over every
        # shard (a Replicate DTensor): the norm of the whole gradient, as one process has it.
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)
        full_tensor = getattr(norm, "full_tensor", None)
        return full_tensor() if callable(full_tensor) else norm

    def teardown(self) -> None:
        # Sharded modules' states sit in reference cycles and hold the process group: freed
        # after it is destroyed, at interpreter exit, gloo may abort ("terminate called
        # without an active exception"). Collect them first.
        gc.collect()
        super().teardown()

    # --- state dicts -------------------------------------------------------------------------
    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        """The consolidated full weights (on the CPU) on global rank 0; an empty dict on the
        other processes, which take part in the gathering."""
        if not _is_sharded(module):
            return super().full_state_dict(module)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(module, options=_full_options())
        return _strip_dispatcher(module, state)

    def full_optimizer_state_dict(self, module: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The optimizer's full (unsharded) state, keyed by parameter names, on global rank 0
        (CPU); an empty dict on the other processes."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a prepared optimizer's real one
        if not _is_sharded(module):
            return super().full_optimizer_state_dict(module, optimizer)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state: dict[str, Any] = dict(
            get_optimizer_state_dict(module, optimizer, options=_full_options())
        )
        if not state or not isinstance(module, StepDispatcher):
            return state
        return {
            "state": _strip_dispatcher(module, state["state"]),
            "param_groups": [
                {
                    **group,
                    "params": [_strip_name(name) for name in group["params"]],
                }
                for group in state["param_groups"]
            ],
        }

    def load_full_state_dict(self, module: nn.Module, state_dict: dict[str, Tensor]) -> None:
        """Load full weights (as ``full_state_dict`` gives them) into the sharded module; only
        global rank 0's ``state_dict`` is read (the others may pass an empty dict)."""
        if not _is_sharded(module):
            super().load_full_state_dict(module, state_dict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if isinstance(module, StepDispatcher):
            state_dict = {_DISPATCHER_PREFIX + name: value for name, value in state_dict.items()}
        set_model_state_dict(
            module,
            dict(state_dict),
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )

    def load_full_optimizer_state_dict(
        self, module: nn.Module, optimizer: Any, state: dict[str, Any]
    ) -> None:
        """Load an optimizer state given by ``full_optimizer_state_dict`` (rank 0's is read)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if not _is_sharded(module):
            super().load_full_optimizer_state_dict(module, optimizer, state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if isinstance(module, StepDispatcher) and state:
            state = {
                "state": {_DISPATCHER_PREFIX + k: v for k, v in state["state"].items()},
                "param_groups": [
                    {**group, "params": [_DISPATCHER_PREFIX + n for n in group["params"]]}
                    for group in state["param_groups"]
                ],
            }
        set_optimizer_state_dict(
            module,
            optimizer,
            state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )

    # --- helpers -----------------------------------------------------------------------------
    def _mixed_precision_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        name = self.precision.name if self.precision is not None else "32-true"
        if name == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if name == "16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        return None  # 32-true; bf16-true: the weights are bf16 already


@contextmanager
def _without_gradient_sync(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _is_fsdp_module(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is (or lies inside) a module sharded by ``fully_shard``."""
    from torch.distributed.tensor import DTensor

    if _is_fsdp_module(module):
        return True
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _user_module(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, StepDispatcher) else module


def _strip_name(name: Any) -> Any:
    if isinstance(name, str) and name.startswith(_DISPATCHER_PREFIX):
        return name[len(_DISPATCHER_PREFIX) :]
    return name


def _strip_dispatcher(module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(module, StepDispatcher):
        return state
    return {_strip_name(name): value for name, value in state.items()}


def _check_shard_modules(value: Any) -> list[type[nn.Module] | str] | None:
    if value is None:
        return None
    accepted = (
        "use None (the module's _no_split_modules, else the children of each nn.ModuleList) "
        "or a list of nn.Module subclasses or class names present in the model, such as "
        "[Block] or ['Block']."
    )
    if isinstance(value, (str, type)) or not isinstance(value, (list, tuple)):
        raise MisconfigurationError(
            f"`FSDPStrategy(shard_modules={value!r})` is not supported: {accepted}"
        )
    for item in value:
        valid_class = isinstance(item, type) and issubclass(item, nn.Module)
        if not (valid_class or (isinstance(item, str) and item)):
            raise MisconfigurationError(
                f"`FSDPStrategy(shard_modules={value!r})` is not supported: {item!r} is neither "
                f"an nn.Module subclass nor a class name; {accepted}"
            )
    return list(value)


def _check_present(
    wanted: list[type[nn.Module] | str], modules: list[nn.Module], user: nn.Module
) -> None:
    present = {type(candidate) for candidate in modules}
    names = {kind.__name__ for kind in present}
    missing = [
        want
        for want in wanted
        if (want not in names if isinstance(want, str) else want not in present)
    ]
    if missing:
        shown = ", ".join(
            repr(want) if isinstance(want, str) else want.__name__ for want in missing
        )
        raise MisconfigurationError(
            f"`FSDPStrategy(shard_modules=...)` names {shown}, which is not a class of any "
            f"submodule of {type(user).__name__}. Its module classes are: "
            f"{', '.join(sorted(names))}."
        )
