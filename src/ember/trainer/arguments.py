"""Checking and resolving the Trainer's arguments.

Every check raises ``MisconfigurationError`` naming the argument, the value given and what is
accepted, before any work starts.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ember.accelerator import distributed
from ember.accelerator.strategies import Strategy, pick_device, resolve_strategy
from ember.errors import MisconfigurationError, one_of
from ember.hooks import Callback
from ember.loggers.base import Logger
from ember.loggers.lifecycle import share_run_folders
from ember.module import TrainModule, overrides


def check_count(
    name: str, value: Any, allow_none: bool = False, meaning_of_minus_one: str = "no limit"
) -> Any:
    """An integer >= 0, or -1 (which means ``meaning_of_minus_one``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: use an integer >= 0, or -1 for "
            f"{meaning_of_minus_one}."
        )
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise MisconfigurationError(one_of(name, value, choices))
    return str(value)


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(value: Any) -> bool | dict[str, Any]:
    """True, False, or a dict of ``torch.compile`` arguments (checked against its signature)."""
    if not isinstance(value, (bool, dict)):
        raise MisconfigurationError(
            f"`compile={value!r}` is not supported: use True, False, or a dict of "
            "torch.compile arguments such as {'mode': 'max-autotune'}."
        )
    if isinstance(value, dict):
        accepted = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
        unknown = sorted(set(value) - set(accepted))
        if unknown:
            raise MisconfigurationError(
                f"`compile={value!r}` has arguments torch.compile does not take: {unknown}. "
                f"Accepted: {accepted}."
            )
        if value.get("mode") is not None and value["mode"] not in _COMPILE_MODES:
            raise MisconfigurationError(one_of("compile['mode']", value["mode"], _COMPILE_MODES))
    return value


def check_positive(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: it must be an integer >= 1."
        )
    return value


def check_clip_value(value: Any) -> float | None:
    """A finite number >= 0; None or 0 means no clipping (returned as None): clipping to 0
    would zero every gradient."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise MisconfigurationError(
            f"`gradient_clip_val={value!r}` is not supported: use a finite number >= 0, or None "
            "(or 0) for no clipping."
        )
    return float(value) if value != 0 else None


def check_flag(name: str, value: Any) -> bool:
    """True or False."""
    if not isinstance(value, bool):
        raise MisconfigurationError(f"`{name}={value!r}` is not supported: use True or False.")
    return value


def check_directory(name: str, value: Any) -> Path:
    """A path (str or os.PathLike)."""
    if not isinstance(value, (str, os.PathLike)):
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: give a folder path (str or pathlib.Path)."
        )
    return Path(value)


def check_loader(role: str, loader: Any) -> None:
    """Something to iterate over batches (a DataLoader, or any iterable of batches)."""
    if isinstance(loader, Mapping):
        raise MisconfigurationError(
            f"{role} got a dict of loaders ({sorted(loader)}); pass one loader or a list of them."
        )
    if isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
        raise MisconfigurationError(
            f"{role} got {type(loader).__name__}, which is not a data loader: pass a "
            "torch.utils.data.DataLoader (or any iterable of batches)."
        )


def check_val_check_interval(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MisconfigurationError(
            f"`val_check_interval={value!r}` is not supported: use a float in (0, 1] (a fraction "
            "of the epoch) or an int >= 1 (a number of training batches)."
        )
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise MisconfigurationError(
            f"`val_check_interval={value!r}` is not supported: a float must be in (0, 1]; for a "
            "number of batches pass an int."
        )
    if isinstance(value, int) and value < 1:
        raise MisconfigurationError(
            f"`val_check_interval={value!r}` is not supported: an int must be >= 1."
        )
    return value


def check_limit(name: str, value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: use None (every batch), an int >= 0 (that many "
            "batches) or a float in [0, 1] (that fraction)."
        )
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: a float must be in [0, 1]."
        )
    if isinstance(value, int) and value < 0:
        raise MisconfigurationError(f"`{name}={value!r}` is not supported: an int must be >= 0.")
    return value


def length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def apply_limit(name: str, limit: int | float | None, length: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, int):
        return limit
    if length is None:
        if limit == 1.0:
            return None
        raise MisconfigurationError(
            f"`{name}={limit}` is a fraction, but the loader has no length; give an int."
        )
    return int(length * limit)


def check_module(module: Any) -> None:
    if not isinstance(module, TrainModule):
        raise MisconfigurationError(
            f"Expected a TrainModule (a subclass of ember.TrainModule), got "
            f"{type(module).__name__}. Subclass TrainModule and define training_step and "
            "configure_optimizers."
        )


def check_fit_module(module: Any) -> None:
    """A TrainModule that defines what fit needs: training_step and configure_optimizers."""
    check_module(module)
    if not overrides(module, "training_step"):
        raise MisconfigurationError(
            f"{type(module).__name__} does not define training_step(batch, batch_idx); "
            "the Trainer needs it to compute the loss."
        )
    if not overrides(module, "configure_optimizers"):
        raise MisconfigurationError(
            f"{type(module).__name__} does not define configure_optimizers(); return an "
            "optimizer from it, e.g. torch.optim.AdamW(self.parameters(), lr=1e-3)."
        )


def check_ckpt_path(ckpt_path: Any) -> None:
    """None, ``"last"``, ``"best"`` or a path."""
    if ckpt_path is None or isinstance(ckpt_path, (str, os.PathLike)):
        return
    raise MisconfigurationError(
        f"`ckpt_path={ckpt_path!r}` is not supported: pass a checkpoint directory (str or "
        "path), 'last', 'best' or None."
    )


def set_deterministic(deterministic: bool | str) -> None:
    if deterministic not in (True, False, "warn"):
        raise MisconfigurationError(
            one_of("deterministic", deterministic, ["True", "False", "warn"])
        )
    if deterministic is False:
        return
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_strategy_and_device(
    accelerator: str, devices: Any, num_nodes: Any, strategy: Any
) -> Strategy:
    """The strategy object for the Trainer's ``accelerator`` / ``devices`` / ``num_nodes`` /
    ``strategy``, with this process's device requested on it.

    Several processes (``devices=N`` > 1 or ``num_nodes`` > 1) come from a launcher
    (``ember launch``, ``torchrun``), or, for a plain ``python script.py`` on one machine,
    from the Trainer itself, which starts the other N - 1 processes here. The process count
    comes only from ``WORLD_SIZE`` or an explicit ``devices=N``.
    """
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise MisconfigurationError(
            f"`num_nodes={num_nodes!r}` is not supported: it must be an integer >= 1."
        )
    indices: list[int] | None = None
    if devices == "auto":
        count = None
    elif isinstance(devices, int) and not isinstance(devices, bool):
        count = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, (list, tuple)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices
    ):
        count = len(devices)
        indices = list(devices)
    else:
        raise MisconfigurationError(
            f"`devices={devices!r}` is not supported: use 'auto', a positive integer, or a "
            "list of device indices such as [0, 1]."
        )
    if count is not None and count < 1:
        raise MisconfigurationError(
            f"`devices={devices!r}` selects no device: use 'auto' or an integer >= 1."
        )
    from ember.launcher import launch_workers_if_needed

    # Checked before any process starts: a typo must not start workers only to end them.
    resolve_strategy(strategy)
    pick_device(accelerator)
    # Under a launcher: checks `devices` against it; from plain `python script.py` with
    # devices=N > 1: starts the other N - 1 processes and makes this one rank 0.
    launch_workers_if_needed(count, num_nodes)
    local = distributed.local_rank()
    index = indices[local] if indices is not None and local < len(indices) else local
    device = pick_device(accelerator, index if accelerator != "cpu" else 0)
    resolved = resolve_strategy(strategy)  # "auto" now sees the processes just started
    resolved.requested_device = device
    return resolved


def resolve_callbacks(
    callbacks: Any, enable_progress_bar: bool, enable_checkpointing: bool = True
) -> list[Callback]:
    """The Trainer's callbacks: those given, plus a ``ProgressBar`` (``enable_progress_bar``)
    and a ``ModelCheckpoint(save_last=True)`` (``enable_checkpointing``) unless one is given."""
    from ember.callbacks.checkpoint import ModelCheckpoint
    from ember.callbacks.progress import ProgressBar

    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, Callback):
        callbacks = [callbacks]
    elif isinstance(callbacks, Iterable) and not isinstance(callbacks, (str, bytes)):
        callbacks = list(callbacks)
    else:
        raise MisconfigurationError(
            f"`callbacks` must be a Callback or a list of them, got {type(callbacks).__name__}."
        )
    wrong = [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]
    if wrong:
        raise MisconfigurationError(
            f"`callbacks` must hold ember.Callback instances; got {', '.join(wrong)}."
        )
    has_bar = any(isinstance(cb, ProgressBar) for cb in callbacks)
    if has_bar and not enable_progress_bar:
        raise MisconfigurationError(
            "`enable_progress_bar=False` but a ProgressBar was passed in `callbacks`; remove one."
        )
    if enable_progress_bar and not has_bar:
        callbacks.append(ProgressBar())
    # Any callback that writes checkpoints (ModelCheckpoint, or one of the user's) counts.
    writers = [type(cb).__name__ for cb in callbacks if type(cb).writes_checkpoints]
    if writers and not enable_checkpointing:
        raise MisconfigurationError(
            f"`enable_checkpointing=False` but `callbacks` holds {', '.join(writers)}, which "
            "writes checkpoints; remove one of the two."
        )
    if enable_checkpointing and not writers:
        callbacks.append(ModelCheckpoint(save_last=True))
    return callbacks


def merge_module_callbacks(callbacks: list[Callback], module: Any) -> list[Callback]:
    """The Trainer's ``callbacks`` with those of ``module.configure_callbacks()`` added
    (Lightning's rule): a Trainer callback whose type is that of a module callback, or a base
    of it, is replaced by it. The order of ``collect_hooks`` still puts writers last."""
    given = module.configure_callbacks()
    if given is None:
        return callbacks
    extra = [given] if isinstance(given, Callback) else list(given)
    wrong = [type(cb).__name__ for cb in extra if not isinstance(cb, Callback)]
    if wrong:
        raise MisconfigurationError(
            f"{type(module).__name__}.configure_callbacks() must return a Callback or a list of "
            f"them; got {', '.join(wrong)}."
        )
    if not extra:
        return callbacks
    replaced = {
        type(own)
        for own in callbacks
        for cb in extra
        if isinstance(cb, type(own)) and cb is not own
    }
    return [cb for cb in callbacks if type(cb) not in replaced or cb in extra] + [
        cb for cb in extra if not any(cb is own for own in callbacks)
    ]


def resolve_loggers(logger: Any, root: Path) -> list[Logger]:
    if logger is True:
        from ember.loggers.tensorboard import TensorBoardLogger, tensorboard_available

        if tensorboard_available():
            return [TensorBoardLogger(root, name="ember_logs")]
        from ember.loggers.csv import CSVLogger

        return [CSVLogger(root, name="ember_logs")]
    if logger is False or logger is None:
        return []
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
    wrong = [type(item).__name__ for item in loggers if not isinstance(item, Logger)]
    if wrong:
        raise MisconfigurationError(
            f"`logger` must be True, False, an ember Logger or a list of them; got {', '.join(wrong)}."
        )
    # One run folder: CSVLogger("logs") and TensorBoardLogger("logs") share version_N.
    share_run_folders(loggers)
    return loggers
