"""How an ``Accelerator`` prepares modules, optimizers, schedulers and loaders, and the record
of what it prepared.

A ``Preparer`` is built once per accelerator from the objects that do the work (the strategy,
the precision plugin, the gradient state, the optimizer step) and a ``Tracked`` record: the
prepared objects in order, which ``save_state`` / ``load_state`` save and restore and
``free_memory`` forgets. The accelerator's settings (``device_placement``,
``dataloader_config``, ``step_scheduler_with_optimizer``) stay the accelerator's: each call is
handed the ones it needs.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember.accelerator.checkpointing import Tracked
from ember.accelerator.data import PreparedDataLoader, is_data_loader, prepare_loader
from ember.accelerator.optim import AcceleratedOptimizer, AcceleratedScheduler, GradientState
from ember.accelerator.precision import Precision
from ember.accelerator.sharding import ProcessGroupCollectives
from ember.accelerator.step import OptimizerStep
from ember.accelerator.strategies import StepDispatcher, Strategy
from ember.accelerator.transfer import DataLoaderConfiguration, TransferHooks
from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.accelerator.accelerator import Accelerator


def prepare_in_order(accelerator: Accelerator, objects: tuple[Any, ...]) -> Any:
    """``Accelerator.prepare``: each object through the accelerator's ``prepare_*`` method of
    its kind, returned in the same order (a single object alone, not in a tuple)."""
    prepared: list[Any] = list(objects)
    # Schedulers last: they must find the wrapped optimizer of their raw optimizer.
    for index, obj in enumerate(objects):
        if isinstance(obj, nn.Module):
            prepared[index] = accelerator.prepare_model(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            prepared[index] = accelerator.prepare_optimizer(obj)
        elif is_data_loader(obj):
            prepared[index] = accelerator.prepare_data_loader(obj)
    for index, obj in enumerate(objects):
        if _is_scheduler(obj):
            prepared[index] = accelerator.prepare_scheduler(obj)
        elif prepared[index] is obj and not isinstance(
            obj, (nn.Module, torch.optim.Optimizer, PreparedDataLoader)
        ):
            raise MisconfigurationError(
                f"`prepare` got an object of type {type(obj).__name__}; it accepts "
                "torch.nn.Module, torch.optim.Optimizer, an LR scheduler and "
                "torch.utils.data.DataLoader."
            )
    return prepared[0] if len(prepared) == 1 else tuple(prepared)


def _is_scheduler(obj: Any) -> bool:
    return isinstance(
        obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    )


class Preparer:
    """Prepares objects for one accelerator and keeps them in ``tracked`` (in order)."""

    def __init__(
        self,
        strategy: Strategy,
        precision: Precision,
        gradient_state: GradientState,
        optimizer_step: OptimizerStep,
        tracked: Tracked,
    ) -> None:
        self.strategy = strategy
        self.precision = precision
        self.gradient_state = gradient_state
        self.optimizer_step = optimizer_step
        #: Everything prepared and registered; ``optimizer_step`` shares its optimizer list.
        self.tracked = tracked

    def model(self, model: nn.Module, *, autocast_forward: bool, place: bool) -> nn.Module:
        """``Accelerator.prepare_model``; ``place``: its ``device_placement``."""
        model = self.precision.convert_module(model)
        if autocast_forward:
            self.precision.wrap_forward(model)
        if place:
            model = self.strategy.setup_module(model)
            # FSDP replaced the parameters: optimizers prepared before follow them.
            for optimizer in self.tracked.optimizers:
                self.strategy.update_optimizer(optimizer.optimizer)
        if not any(known is model for known in self.tracked.models):
            self.tracked.models.append(model)
        return model

    def steps(
        self, module: nn.Module, names: tuple[str, ...], *, place: bool
    ) -> tuple[nn.Module, dict[str, Callable[..., Any]]]:
        """``Accelerator.prepare_steps``."""
        strategy = self.strategy
        through = {
            name
            for name in names
            if strategy.wraps_module
            and (name == "training_step" or strategy.evaluates_through_wrapper)
        }
        if not through:
            # One device; or DDP evaluating on the bare module: placed, no wrapper to build.
            if strategy.wraps_module:
                model = self.precision.convert_module(module).to(strategy.device)
            else:
                model = self.model(module, autocast_forward=False, place=place)
            return model, {name: getattr(module, name) for name in names}
        # A dispatcher sharded by an earlier call (FSDP: fit, then validate) is the model
        # again: its parameters belong to it, and sharding them twice is refused by torch.
        known = [
            model
            for model in self.tracked.models
            if isinstance(model, StepDispatcher) and model.module is module
        ]
        if known:
            model = known[0]
        else:
            model = self.model(StepDispatcher(module), autocast_forward=False, place=place)
        steps = {}
        for name in names:
            steps[name] = partial(model, name) if name in through else getattr(module, name)
        return model, steps

    def optimizer(self, optimizer: torch.optim.Optimizer) -> AcceleratedOptimizer:
        """``Accelerator.prepare_optimizer``."""
        if isinstance(optimizer, AcceleratedOptimizer):
            return optimizer
        # Built over the module before FSDP sharded it: point it at the sharded parameters.
        self.strategy.update_optimizer(optimizer)
        for known in self.tracked.optimizers:  # prepared again (a re-run notebook cell)
            if known.optimizer is optimizer:
                return known
        wrapped = AcceleratedOptimizer(optimizer, self.optimizer_step)
        self.tracked.optimizers.append(wrapped)
        return wrapped

    def scheduler(
        self, scheduler: Any, *, step_with_optimizer: bool, split_batches: bool
    ) -> AcceleratedScheduler:
        """``Accelerator.prepare_scheduler``; ``split_batches``: the loader configuration's."""
        if isinstance(scheduler, AcceleratedScheduler):
            return scheduler
        optimizers = self.tracked.optimizers
        owners = [
            optimizer
            for optimizer in optimizers
            if optimizer.optimizer is scheduler.optimizer or optimizer is scheduler.optimizer
        ]
        wrapped = AcceleratedScheduler(
            scheduler,
            owners or list(optimizers),
            self.gradient_state,
            step_with_optimizer=step_with_optimizer,
            # Accelerate's convention: each process's loader is num_processes times shorter.
            steps_per_call=1 if split_batches else self.strategy.world_size,
        )
        self.tracked.schedulers.append(wrapped)
        return wrapped

    def data_loader(
        self,
        data_loader: Any,
        config: DataLoaderConfiguration,
        max_batches: int | None,
        *,
        place: bool,
        even_batches: bool | None,
        remember: bool,
        transfer_hooks: TransferHooks | None,
    ) -> PreparedDataLoader:
        """``Accelerator.prepare_data_loader``; ``config``: its ``dataloader_config``."""
        strategy = self.strategy
        collectives = None
        if strategy.world_size > 1:
            collectives = ProcessGroupCollectives(
                strategy.global_rank, strategy.world_size, strategy.device
            )
        prepared = prepare_loader(
            data_loader,
            self.gradient_state,
            strategy.device if place else None,
            self.precision,
            config,
            max_batches,
            collectives=collectives,
            even_batches=even_batches,
            transfer_hooks=transfer_hooks,
        )
        if remember:
            self.tracked.dataloaders.append(prepared)  # save_state records where it stands
        return prepared

    def forget(self) -> None:
        """``Accelerator.free_memory``: drop every prepared object (registered objects stay)
        and start a fresh gradient state."""
        self.optimizer_step.end_iteration()
        tracked = self.tracked
        for optimizer in tracked.optimizers:
            optimizer.release()
        # Cleared in place: the optimizer step holds the same optimizer list.
        tracked.models.clear()
        tracked.optimizers.clear()
        tracked.schedulers.clear()
        tracked.dataloaders.clear()
        self.gradient_state.reset()
        gc.collect()
        if self.strategy.device.type == "cuda":
            torch.cuda.empty_cache()
