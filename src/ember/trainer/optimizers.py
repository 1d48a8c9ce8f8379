"""Reading what ``configure_optimizers`` returned."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, ReduceLROnPlateau

from ember.errors import MisconfigurationError

_ACCEPTED = (
    "an optimizer; (optimizer, scheduler); [optimizer, ...]; ([optimizers], [schedulers]); "
    '{"optimizer": optimizer, "lr_scheduler": scheduler | {"scheduler": scheduler, '
    '"interval": "step" | "epoch", "frequency": 1, "monitor": name}, "monitor": name}; or a '
    "list of such dicts (several optimizers need manual optimization)"
)


@dataclass
class SchedulerConfig:
    """A scheduler and when the loop steps it."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    #: The ``"name"`` of the scheduler dict: ``LearningRateMonitor`` logs ``lr-<name>``.
    name: str | None = None
    #: ``ReduceLROnPlateau`` whose monitored name was not logged: raise (True) or warn and
    #: skip that step (False).
    strict: bool = True
    #: Whether ``step`` takes the monitored value (``ReduceLROnPlateau``); decided before the
    #: scheduler is wrapped.
    needs_metric: bool = False

    def __post_init__(self) -> None:
        self.needs_metric = isinstance(self.scheduler, ReduceLROnPlateau)


def parse_optimizers(returned: Any) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    """The optimizers and their schedulers, with an error that names what was returned.

    Accepted: an optimizer; ``(optimizer, scheduler)``; a list of optimizers (and
    schedulers); ``([optimizers], [schedulers])``; a dict with ``"optimizer"`` (and
    ``"lr_scheduler"``, ``"monitor"``); a list of such dicts. Several optimizers are for manual
    optimization; the Trainer checks that. Every scheduler must be built on one of the
    returned optimizers.
    """
    optimizers, configs = _parse(returned)
    for config in configs:
        if not any(config.scheduler.optimizer is optimizer for optimizer in optimizers):
            names = ", ".join(type(optimizer).__name__ for optimizer in optimizers)
            raise MisconfigurationError(
                f"{type(config.scheduler).__name__} is built on an optimizer that "
                f"configure_optimizers did not return (it returned: {names}). Build each "
                "scheduler on one of the returned optimizers, or return its optimizer too."
            )
    return optimizers, configs


def _parse(returned: Any) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    if isinstance(returned, Optimizer):
        return [returned], []
    if isinstance(returned, Mapping):
        return _from_dict(returned)
    if isinstance(returned, (list, tuple)) and returned:
        if all(isinstance(item, Mapping) for item in returned):
            optimizers: list[Optimizer] = []
            configs: list[SchedulerConfig] = []
            for item in returned:
                more_optimizers, more_configs = _from_dict(item)
                optimizers += more_optimizers
                configs += more_configs
            return optimizers, configs
        if len(returned) == 2 and isinstance(returned[0], (list, tuple)):
            optimizers, schedulers = list(returned[0]), returned[1]
            schedulers = list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]
        elif isinstance(returned[0], Optimizer):
            optimizers = [item for item in returned if isinstance(item, Optimizer)]
            schedulers = [item for item in returned if not isinstance(item, Optimizer)]
        else:
            raise _unsupported(returned)
        if not optimizers or not all(isinstance(item, Optimizer) for item in optimizers):
            raise _unsupported(returned)
        return optimizers, [_scheduler_config(item) for item in schedulers]
    raise _unsupported(returned)


def check_automatic(optimizers: list[Optimizer], module_name: str) -> None:
    """Automatic optimization steps one optimizer: several are a clear error."""
    if len(optimizers) != 1:
        names = ", ".join(type(optimizer).__name__ for optimizer in optimizers)
        raise MisconfigurationError(
            f"configure_optimizers returned {len(optimizers)} optimizers ({names}); automatic "
            "optimization steps exactly one. For several (a GAN, say), use manual "
            f"optimization: set `self.automatic_optimization = False` in "
            f"{module_name}.__init__ and call `opt.step()` for each of `self.optimizers()` in "
            "training_step. Or put every parameter group in one optimizer."
        )


def _from_dict(returned: Mapping[str, Any]) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    unknown = set(returned) - {"optimizer", "lr_scheduler", "monitor"}
    if unknown or not isinstance(returned.get("optimizer"), Optimizer):
        raise _unsupported(returned)
    schedulers = []
    if returned.get("lr_scheduler") is not None:
        # A top-level "monitor" serves a scheduler that names none (Lightning's form for
        # ReduceLROnPlateau: {"optimizer": opt, "lr_scheduler": plateau, "monitor": name}).
        schedulers.append(_scheduler_config(returned["lr_scheduler"], returned.get("monitor")))
    return [returned["optimizer"]], schedulers


def _scheduler_config(item: Any, monitor: str | None = None) -> SchedulerConfig:
    if isinstance(item, Mapping):
        unknown = set(item) - {"scheduler", "interval", "frequency", "monitor", "name", "strict"}
        if unknown:
            raise MisconfigurationError(
                f"The lr_scheduler dict has unknown keys {sorted(unknown)}; accepted keys: "
                "'scheduler', 'interval', 'frequency', 'monitor', 'name', 'strict'."
            )
        if "scheduler" not in item:
            raise MisconfigurationError(
                "The lr_scheduler dict needs a 'scheduler' key holding the scheduler object."
            )
        config = SchedulerConfig(
            item["scheduler"],
            item.get("interval", "epoch"),
            item.get("frequency", 1),
            item.get("monitor") if item.get("monitor") is not None else monitor,
            item.get("name"),
            item.get("strict", True),
        )
    else:
        config = SchedulerConfig(item, monitor=monitor)
    if not isinstance(config.scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise MisconfigurationError(
            f"configure_optimizers returned a scheduler of type "
            f"{type(config.scheduler).__name__}; expected a torch.optim.lr_scheduler scheduler."
        )
    if config.name is not None and not isinstance(config.name, str):
        raise MisconfigurationError(
            f"lr_scheduler `name={config.name!r}` is not supported: it must be a string "
            "(LearningRateMonitor logs the rate as 'lr-<name>')."
        )
    if not isinstance(config.strict, bool):
        raise MisconfigurationError(
            f"lr_scheduler `strict={config.strict!r}` is not supported: use True (a missing "
            "monitored value raises) or False (it warns and skips that step)."
        )
    if config.interval not in ("step", "epoch"):
        raise MisconfigurationError(
            f"lr_scheduler `interval={config.interval!r}` is not supported. Accepted values: "
            "'step', 'epoch'."
        )
    if (
        not isinstance(config.frequency, int)
        or isinstance(config.frequency, bool)
        or config.frequency < 1
    ):
        raise MisconfigurationError(
            f"lr_scheduler `frequency={config.frequency!r}` is not supported: it must be an "
            "integer >= 1."
        )
    if config.needs_metric and config.monitor is None:
        raise MisconfigurationError(
            "ReduceLROnPlateau needs the name of the metric it watches: return "
            '{"optimizer": opt, "lr_scheduler": sched, "monitor": "val_loss"} or '
            '{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}.'
        )
    if isinstance(config.scheduler, OneCycleLR) and config.interval == "epoch":
        warnings.warn(
            "OneCycleLR is stepped with interval='epoch' (the default interval): it then "
            "advances once per epoch, while its total_steps counts optimizer steps, so the "
            "cycle does not run as planned (and it raises once stepped past total_steps). "
            'Return {"optimizer": opt, "lr_scheduler": {"scheduler": one_cycle, '
            '"interval": "step"}}.',
            UserWarning,
            stacklevel=2,
        )
    return config


def _describe(returned: Any) -> str:
    if isinstance(returned, (list, tuple)):
        inner = ", ".join(type(item).__name__ for item in returned)
        return f"{type(returned).__name__}[{inner}]"
    if isinstance(returned, Mapping):
        return "dict with keys " + ", ".join(repr(key) for key in returned)
    return type(returned).__name__


def _unsupported(returned: Any) -> MisconfigurationError:
    return MisconfigurationError(
        f"configure_optimizers returned {_describe(returned)}, which is not supported. "
        f"Return {_ACCEPTED}."
    )
