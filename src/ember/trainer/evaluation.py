"""Evaluation and prediction: ``evaluate`` (validation, test, the sanity check) and
``predict``, each a plain for-loop over the prepared loaders that fires events by name.

Like the training loop (``loops.py``), each takes the ``RunContext`` of the run and never the
Trainer itself. Both run the module in eval mode and put every submodule's own train/eval
mode back when they end; ``evaluate`` also leaves training's random streams as it found them.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ember.accelerator import distributed
from ember.accelerator.data import assemble_in_order
from ember.accelerator.nested import apply_to_tensors
from ember.checkpoint.rng import capture_rng, restore_rng
from ember.trainer.profiling import VALIDATION

if TYPE_CHECKING:
    from ember.accelerator.data import PreparedDataLoader
    from ember.trainer.context import RunContext


def sanity_limit(context: RunContext) -> int | None:
    steps = context.settings.num_sanity_val_steps
    return None if steps == -1 else steps


def evaluate(
    context: RunContext, stage: str, loaders: list[PreparedDataLoader], sanity: bool = False
) -> list[dict[str, float]]:
    """Run ``<stage>_step`` over every loader; return one dict of metrics per loader."""
    module = context.module
    metrics = context.eval_metrics
    hooks = context.hooks
    step = getattr(context.steps, f"{stage}_step")
    batch_start = hooks[f"on_{stage}_batch_start"]
    batch_end = hooks[f"on_{stage}_batch_end"]
    limit = sanity_limit(context) if sanity else None
    # Step values of evaluation go to the loggers after each batch, on the stage's own step
    # counter (Lightning's convention), not at the training step.
    counter = f"{stage}_batches"
    state = context.state
    several = len(loaders) > 1
    pass_index = several and takes_dataloader_idx(getattr(module, f"{stage}_step"))
    modes = module_modes(module)
    previous_metrics = context.active_metrics
    context.active_metrics = metrics
    autocast = context.accelerator.autocast
    # Evaluation never moves training's random streams (its loaders draw seeds): adding or
    # moving a validation leaves training bit-identical, and a checkpoint written at a
    # step resumes exactly whether or not a validation followed it.
    random_state = capture_rng()
    context.training_rng = random_state  # what a checkpoint written meanwhile records
    context.validation_incomplete = stage == "validation" and not sanity
    module.eval()
    # Validation inside fit is its own line of the profile, hooks included: not a step part.
    resumed = context.profiler.enter(VALIDATION)
    try:
        metrics.start(on_step=False, on_epoch=True)  # on_<stage>_start may log epoch values
        context.fire(f"on_{stage}_start")
        context.fire(f"on_{stage}_epoch_start")
        with torch.no_grad():
            for dataloader_idx, loader in enumerate(loaders):
                metrics.dataloader_idx = dataloader_idx if several else None
                extra = (dataloader_idx,) if several else ()
                step_extra = extra if pass_index else ()
                loader.set_epoch(context.state.epoch)  # the trainer's epoch, as in training
                for batch_idx, batch in enumerate(loader):
                    if limit is not None and batch_idx >= limit:
                        break
                    metrics.batch = batch
                    for hook in batch_start:
                        hook(batch, batch_idx, *extra)
                    with autocast():
                        outputs = step(batch, batch_idx, *step_extra)
                    for hook in batch_end:
                        hook(outputs, batch, batch_idx, *extra)
                    if not sanity:
                        if metrics.has_step_metrics:
                            step_values = metrics.pop_step_metrics()
                            context.send_to_loggers(step_values, getattr(state, counter))
                        setattr(state, counter, getattr(state, counter) + 1)
        metrics.dataloader_idx = None
        metrics.batch = None  # what the epoch-end hooks log is not from a batch
        values, for_loggers = metrics.reduce_epoch(context.epoch_sync)
        context.validation_incomplete = False  # its values are in callback_metrics now
        context.fire(f"on_{stage}_epoch_end")
        more_values, more_for_loggers = metrics.reduce_epoch(context.epoch_sync)
        values.update(more_values)
        for_loggers.update(more_for_loggers)
        metrics.close()
        context.last_eval_metrics = {} if sanity else dict(values)
        if sanity:  # nothing of the sanity check may remain, step values included
            metrics.forget(metrics.keys())
        else:
            context.send_to_loggers({**metrics.pop_step_metrics(), **for_loggers})
        context.fire(f"on_{stage}_end")
    finally:
        context.profiler.enter(resumed)
        context.active_metrics = previous_metrics
        context.training_rng = None
        context.validation_incomplete = False
        restore_rng(random_state)
        restore_modes(modes)
    grouped = metrics.values_by_dataloader(values)
    return [grouped.get(index, {}) for index in range(len(loaders))]


def module_modes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every submodule of ``module`` with its ``training`` flag, for ``restore_modes``."""
    return [(submodule, submodule.training) for submodule in module.modules()]


def restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    """Put back each submodule's own mode (not ``module.train()``, which would put a
    submodule the user set to eval in training mode). Once per evaluation, not per step."""
    for submodule, training in modes:
        submodule.training = training


def in_dataset_order(
    context: RunContext, loader: PreparedDataLoader, outputs: list[Any]
) -> list[Any]:
    """The per-batch ``outputs`` of every process, each batch once, in the epoch's order.

    Each output is paired with where its batch sits in the epoch (``batch_places``), the
    pairs of every process gathered (one ``all_gather_object``, through the CPU: tensors come
    back on the CPU) and put in order. With one process, or a loader the user sharded
    (a ``DistributedSampler``: nothing says where its batches sit), ``outputs`` as they are.
    """
    places = loader.batch_places
    if context.accelerator.num_processes == 1 or places is None:
        return outputs
    pairs = list(zip(places, apply_to_tensors(outputs, Tensor.cpu), strict=True))
    every = distributed.all_gather_object(pairs)
    return assemble_in_order(pair for pairs_of_rank in every for pair in pairs_of_rank)


def takes_dataloader_idx(step: Any) -> bool:
    """Whether a ``*_step`` method accepts a third argument, ``dataloader_idx``.

    With several loaders it is passed only to steps that take it; the logged names are
    suffixed with ``/dataloader_idx_N`` either way.
    """
    try:
        parameters = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 3


def predict(context: RunContext, loaders: list[PreparedDataLoader]) -> list[Any]:
    """``predict_step`` over every loader: a list of outputs (a list of lists for several).

    In a run of several processes, every process returns every output once, in the order one
    process would produce them (``in_dataset_order``).
    """
    module = context.module
    hooks = context.hooks
    predict_step = context.steps.predict_step
    autocast = context.accelerator.autocast
    several = len(loaders) > 1
    pass_index = several and takes_dataloader_idx(module.predict_step)
    modes = module_modes(module)
    module.eval()
    results: list[list[Any]] = []
    context.fire("on_predict_start")
    context.fire("on_predict_epoch_start")
    with torch.no_grad():
        for dataloader_idx, loader in enumerate(loaders):
            extra = (dataloader_idx,) if several else ()
            step_extra = extra if pass_index else ()
            outputs_of_loader: list[Any] = []
            loader.set_epoch(context.state.epoch)
            for batch_idx, batch in enumerate(loader):
                for hook in hooks["on_predict_batch_start"]:
                    hook(batch, batch_idx, *extra)
                with autocast():
                    outputs = predict_step(batch, batch_idx, *step_extra)
                for hook in hooks["on_predict_batch_end"]:
                    hook(outputs, batch, batch_idx, *extra)
                outputs_of_loader.append(outputs)
            results.append(in_dataset_order(context, loader, outputs_of_loader))
    context.fire("on_predict_epoch_end")
    context.fire("on_predict_end")
    restore_modes(modes)
    return results if several else results[0]
