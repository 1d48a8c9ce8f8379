"""Precision plugins: how the forward runs (autocast), how gradients are scaled and unscaled.

Each mode is one small object with the same methods, so the loop never branches on the mode:
a feature that is off is a method that does nothing.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ember.config import load_config
from ember.errors import MisconfigurationError, one_of

#: Every spelling accepted by ``Trainer(precision=...)`` and ``Accelerator(mixed_precision=...)``
#: mapped to the canonical Trainer name.
PRECISION_ALIASES: dict[Any, str] = {
    "32-true": "32-true",
    "32": "32-true",
    32: "32-true",
    "no": "32-true",
    "fp32": "32-true",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
    16: "16-mixed",
    "fp16": "16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "bf16-true": "bf16-true",
}

#: The Accelerate-style name of each mode (``Accelerator.mixed_precision``).
ACCELERATE_NAMES = {
    "32-true": "no",
    "16-mixed": "fp16",
    "bf16-mixed": "bf16",
    "bf16-true": "bf16-true",
}


# One shared instance: nullcontext holds no state, and creating one per step shows up in the
# per-step overhead.
_NO_AUTOCAST = nullcontext()


def canonical_precision(value: Any, argument: str = "precision") -> str:
    """The canonical name for any accepted spelling; a clear error for anything else."""
    try:
        return PRECISION_ALIASES[value]
    except (KeyError, TypeError):
        accepted = ["32-true", "16-mixed", "bf16-mixed", "bf16-true", "no", "fp16", "bf16"]
        raise MisconfigurationError(one_of(argument, value, accepted)) from None


def resolve_mixed_precision(mixed_precision: str | None) -> str:
    """The canonical precision: the argument, else ``EMBER_MIXED_PRECISION``, else the config
    file written by ``ember config``, else full precision."""
    if mixed_precision is not None:
        return canonical_precision(mixed_precision, "mixed_precision")
    from_env = os.environ.get("EMBER_MIXED_PRECISION")
    if from_env:
        return canonical_precision(from_env, "EMBER_MIXED_PRECISION")
    from_file = load_config().get("mixed_precision")
    if from_file:
        return canonical_precision(from_file, "mixed_precision (in the ember config file)")
    return "32-true"


class Precision:
    """Full fp32 ("32-true"): no autocast, no scaling. The base every mode builds on."""

    name = "32-true"
    #: Whether ``convert_input`` changes anything (lets loaders skip it when it does not).
    casts_inputs = False
    #: Whether gradients are scaled (``backward``, ``unscale`` and ``optimizer_step`` then do
    #: more than the plain calls). When False the accelerator calls torch directly: each layer
    #: of Python per step shows in the overhead benchmark.
    scales_gradients = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def autocast(self, cache_enabled: bool = True) -> AbstractContextManager[Any]:
        """The context the forward pass runs in. ``cache_enabled=False``: no cache of weight
        casts (needed when weights change inside the context: an optimizer step in it)."""
        return _NO_AUTOCAST

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast the module's weights where the mode keeps them in a low precision."""
        return module

    def convert_input(self, data: Any) -> Any:
        """Cast floating-point inputs where the weights are in a low precision."""
        return data

    def wrap_forward(self, module: nn.Module) -> None:
        """Make ``module``'s forward run in this mode's autocast (mixed modes only)."""

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """Backpropagate ``loss`` (scaled, where the mode scales)."""
        loss.backward(**kwargs)

    def unscale(self, optimizer: Optimizer) -> None:
        """Divide the gradients of ``optimizer`` by the loss scale (once per step)."""

    def optimizer_step(self, optimizer: Optimizer, closure: Any, kwargs: dict[str, Any]) -> Any:
        """Step ``optimizer`` (which may skip, on inf/NaN gradients); return what its ``step``
        returned."""
        if closure is None:
            return optimizer.step(**kwargs)
        return optimizer.step(closure, **kwargs)

    def update(self) -> None:
        """Apply what this iteration's steps decided for the loss scale (once per iteration)."""

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty where there is no scaler)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state."""


class MixedPrecision(Precision):
    """Autocast to a low-precision dtype; fp16 also scales the loss (``16-mixed``)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device)
        self.dtype = dtype
        self.name = "16-mixed" if dtype == torch.float16 else "bf16-mixed"

    def autocast(self, cache_enabled: bool = True) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache_enabled)

    def wrap_forward(self, module: nn.Module) -> None:
        # As Accelerate does: the forward runs under autocast and its low-precision floating
        # outputs come back as float32, so a loss computed outside the forward is in fp32.
        forward = module.forward
        if isinstance(forward, AutocastForward):
            return
        function = getattr(forward, "__func__", None)
        if function is None or getattr(forward, "__self__", None) is not module:
            return  # a forward replaced by something unusual: leave it alone
        module.forward = AutocastForward(module, function, self.device.type, self.dtype)


class ScaledMixedPrecision(MixedPrecision):
    """fp16 autocast with a ``torch.amp.GradScaler`` (works on CPU as on CUDA)."""

    scales_gradients = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device, torch.float16)
        self.scaler = torch.amp.GradScaler(device.type)
        #: Whether an unscale or step since the last ``update`` recorded an inf check.
        self.update_pending = False
        #: The optimizers the scaler holds an inf check of (by id, as the scaler keys them):
        #: a copy of this object re-keys those checks to the copied optimizers.
        self.checked: dict[int, Optimizer] = {}

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        self.scaler.scale(loss).backward(**kwargs)

    def unscale(self, optimizer: Optimizer) -> None:
        if any(True for _ in iter_parameters_with_grad(optimizer)):
            # An optimizer without gradients records no inf check; GradScaler.step then
            # raises its own error, as in plain torch.amp.
            self.scaler.unscale_(optimizer)
            self.update_pending = True
            self.checked[id(optimizer)] = optimizer

    def optimizer_step(self, optimizer: Optimizer, closure: Any, kwargs: dict[str, Any]) -> Any:
        # As a keyword, so GradScaler refuses a closure with its own error, as in plain torch.
        if closure is not None:
            kwargs = {**kwargs, "closure": closure}
        result = self.scaler.step(optimizer, **kwargs)
        self.update_pending = True
        self.checked[id(optimizer)] = optimizer
        return result

    def update(self) -> None:
        if self.update_pending:
            self.update_pending = False
            self.scaler.update()
            self.checked.clear()

    def __getstate__(self) -> dict[str, Any]:
        """For pickle and deepcopy, also between a step and the scaler's pending update
        (``GradScaler`` alone refuses then): the scaler travels without its per-optimizer
        inf checks, which travel beside it keyed by the optimizers themselves, so the copy
        re-keys them to its own optimizers. Nothing of the original changes."""
        state = self.__dict__.copy()
        pending = self.scaler._per_optimizer_states
        if pending:
            scaler = torch.amp.GradScaler.__new__(type(self.scaler))
            scaler.__dict__.update(self.scaler.__dict__)
            scaler._per_optimizer_states = fresh = copy.copy(pending)  # the same factory
            fresh.clear()
            state["scaler"] = scaler
            state["checked"] = [
                (self.checked[key], checks)
                for key, checks in pending.items()
                if key in self.checked
            ]
        else:
            state["checked"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        checked = state.pop("checked")
        self.__dict__.update(state)
        self.checked = {}
        if checked and self.scaler._scale is None:
            # The pending update comes before any scale(), which would create these lazily.
            self.scaler._lazy_init_scale_growth_tracker(self.device)
        for optimizer, checks in checked:
            self.scaler._per_optimizer_states[id(optimizer)] = checks
            self.checked[id(optimizer)] = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


class TruePrecision(Precision):
    """Weights, activations and inputs all in bf16 (``bf16-true``): half the memory, no autocast."""

    name = "bf16-true"
    dtype = torch.bfloat16
    casts_inputs = True

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(self.dtype)

    def convert_input(self, data: Any) -> Any:
        return _cast_floats(data, self.dtype)

    def autocast(self, cache_enabled: bool = True) -> AbstractContextManager[Any]:
        # Tensors created inside the step (torch.zeros, arange(...).float()) get bf16 too.
        return _default_dtype(self.dtype)


class AutocastForward:
    """A prepared module's ``forward``: the module's own, under autocast, with fp16/bf16
    floating outputs returned as float32.

    An object holding the module (not a closure), so ``copy.deepcopy``, ``pickle`` and
    ``torch.save`` of the module keep it, pointing at the copy.
    """

    def __init__(
        self, module: nn.Module, function: Callable[..., Any], device_type: str, dtype: torch.dtype
    ) -> None:
        self.module = module
        self.function = function
        self.device_type = device_type
        self.dtype = dtype
        functools.update_wrapper(self, function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            outputs = self.function(self.module, *args, **kwargs)
        return _to_float32(outputs)

    def __reduce__(self) -> Any:
        return (AutocastForward, (self.module, self.function, self.device_type, self.dtype))


def _to_float32(data: Any) -> Any:
    if isinstance(data, Tensor):
        return data.float() if data.dtype in (torch.float16, torch.bfloat16) else data
    if isinstance(data, dict):
        return type(data)({key: _to_float32(value) for key, value in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(_to_float32(value) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_to_float32(value) for value in data)
    return data


class _default_dtype(AbstractContextManager[Any]):
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.previous = torch.get_default_dtype()

    def __enter__(self) -> None:
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc_info: object) -> None:
        torch.set_default_dtype(self.previous)


def _cast_floats(data: Any, dtype: torch.dtype) -> Any:
    if isinstance(data, Tensor):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, dict):
        return {key: _cast_floats(value, dtype) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(_cast_floats(value, dtype) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_cast_floats(value, dtype) for value in data)
    return data


def create_precision(name: str, device: torch.device) -> Precision:
    """The plugin for a canonical precision name on ``device``."""
    if device.type == "cpu" and name != "32-true":
        warn_if_cpu_lacks(name)
    if name == "32-true":
        return Precision(device)
    if name == "16-mixed":
        return ScaledMixedPrecision(device)
    if name == "bf16-mixed":
        return MixedPrecision(device, torch.bfloat16)
    if name == "bf16-true":
        return TruePrecision(device)
    raise MisconfigurationError(one_of("precision", name, list(ACCELERATE_NAMES)))


#: CPU flags (``/proc/cpuinfo``) that give each low-precision dtype native arithmetic.
_NATIVE_CPU_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}
_warned_cpu: set[str] = set()


def warn_if_cpu_lacks(name: str) -> None:
    """Warn once per mode when this CPU has no native arithmetic for the mode's dtype: it
    then emulates it, about ten times slower than fp32."""
    dtype = torch.float16 if name == "16-mixed" else torch.bfloat16
    if name in _warned_cpu or cpu_supports(dtype) is not False:
        return
    _warned_cpu.add(name)
    warnings.warn(
        f"precision {name!r} on this CPU: it has no native {str(dtype).split('.')[-1]} "
        f"arithmetic (none of the CPU flags {', '.join(_NATIVE_CPU_FLAGS[dtype])}), so it is "
        "emulated and typically about 10x slower than '32-true'. It still trains correctly; "
        "use precision='32-true' for speed on this machine.",
        UserWarning,
        stacklevel=3,
    )


def cpu_supports(dtype: torch.dtype) -> bool | None:
    """Whether the CPU has native arithmetic for ``dtype`` (None when it cannot be told)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    present = set(flags.split(":", 1)[-1].split())
    return any(flag in present for flag in _NATIVE_CPU_FLAGS[dtype])


def iter_parameters_with_grad(optimizer: Optimizer) -> Iterator[Tensor]:
    """Every parameter of ``optimizer`` that has a gradient."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                yield parameter
