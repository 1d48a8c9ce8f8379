"""How each ``Trainer`` call is set up, run and torn down, around the loops of ``loops.py``.

Every call (fit, validate, test, predict) is one *run*: a ``RunContext`` built from the
Trainer's settings, the ``setup`` hooks, a body (the call's own work: loaders, checkpoint,
loop) and, whatever happens, the ``teardown`` hooks. The Trainer keeps the context of its
current or last run (what its read-only properties read) and calls:

- ``new_context``: the run's context, built from the Trainer's public settings;
- ``fit_body``, ``evaluation_body``, ``predict_body``: what each call checks before the run
  (given loaders, the checkpoint) and the body that runs inside it;
- ``run``: the lifecycle around a body (setup, ``on_exception``, teardown, loggers).

Everything is handed the ``Trainer`` and reads its public attributes only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.accelerator import distributed
from ember.accelerator.data import PreparedDataLoader
from ember.datamodule import DataModule
from ember.errors import MisconfigurationError
from ember.loggers.lifecycle import end_call as end_logger_call
from ember.loggers.lifecycle import start_call as start_logger_call
from ember.module import TrainModule, overrides
from ember.trainer import arguments, loops, preemption, run_control
from ember.trainer import checkpoint as trainer_checkpoint
from ember.trainer.context import LoopSettings, RunContext
from ember.trainer.loaders import (
    datamodule_of,
    eval_loaders,
    fit_loaders,
    prepare_eval_loaders,
    prepare_train_loader,
    start_datamodule,
)

if TYPE_CHECKING:
    from ember.trainer.trainer import Trainer

#: What a run executes inside its lifecycle, given the run's context.
Body = Callable[[RunContext], Any]


def new_context(
    trainer: Trainer, module: TrainModule, stage: str, previous: RunContext | None
) -> RunContext:
    """The context of a new run of ``module``. ``previous``: the run an evaluation continues
    (its progress and metrics); None for a fit, which starts afresh."""
    # Every LoopSettings field is the Trainer attribute of the same name.
    settings = LoopSettings(**{f.name: getattr(trainer, f.name) for f in fields(LoopSettings)})
    return RunContext(
        module=module,
        accelerator=trainer.accelerator,
        settings=settings,
        loggers=trainer.loggers,
        stage=stage,
        previous=previous,
        profiler=trainer.profiler,
    )


def run(
    trainer: Trainer, context: RunContext, stage: str, body: Body, datamodule: DataModule | None
) -> Any:
    """Fire setup, run ``body``, and always tear down (``on_exception`` on errors).

    ``datamodule``: prepared and set up before every other setup hook, torn down before every
    other teardown hook (Lightning's order).
    """
    module = context.module
    status = "success"
    try:
        start_logger_call(trainer.loggers, trainer.accelerator, stage, module, datamodule)
        if datamodule is not None:
            datamodule.trainer = trainer
            start_datamodule(trainer.accelerator, datamodule, stage)
        context.fire("setup", stage)
        return body(context)
    except BaseException as exception:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        for callback in trainer.callbacks:
            callback.on_exception(trainer, module, exception)
        module.on_exception(exception)
        raise
    finally:
        context.release()
        context.train_metrics.close()
        context.eval_metrics.close()
        context.active_metrics = context.train_metrics
        if trainer.is_global_zero:  # flushed, not finished: the next call writes on
            end_logger_call(trainer.loggers, status)
        try:
            if datamodule is not None:
                datamodule.teardown(stage)
            context.fire("teardown", stage)
        finally:
            context.state.stage = None


# --- checkpoints ---------------------------------------------------------------------------
def resolve_checkpoint(trainer: Trainer, ckpt_path: Any) -> Path | None:
    """``ckpt_path`` as a path (rank 0's answer for "last" / "best", so every process loads
    the same checkpoint even when their folders differ)."""
    path = trainer_checkpoint.resolve(trainer, ckpt_path)
    if trainer.world_size > 1 and ckpt_path is not None:
        path = trainer.accelerator.broadcast(path)
    return path


def load_weights(trainer: Trainer, module: TrainModule, ckpt_path: Any) -> None:
    """Load the weights of ``ckpt_path`` (a path, "last" or "best") into ``module`` for
    validate / test / predict, checked before anything changes."""
    path = resolve_checkpoint(trainer, ckpt_path)
    if path is None:
        return
    weights = trainer_checkpoint.read_weights_for(module, path)
    trainer.accelerator.strategy.load_full_state_dict(module, weights)


# --- the bodies of the calls -----------------------------------------------------------------
def fit_body(
    trainer: Trainer,
    module: TrainModule,
    train_dataloaders: Any,
    val_dataloaders: Any,
    datamodule: DataModule | None,
    ckpt_path: str | os.PathLike[str] | None,
) -> tuple[Body, DataModule | None]:
    """Check fit's arguments and return its body and its ``DataModule`` (None: none)."""
    arguments.check_fit_module(module)
    arguments.check_ckpt_path(ckpt_path)
    if ckpt_path is None and distributed.restart_count() > 0:
        ckpt_path = "last"  # a restarted group continues from its newest checkpoint
    datamodule, (train_dataloaders, val_dataloaders) = datamodule_of(
        "fit", datamodule, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders
    )
    if datamodule is None:  # a DataModule's loaders come after its setup, in the body
        train_dataloaders, val_dataloaders = fit_loaders(module, train_dataloaders, val_dataloaders)

    def body(context: RunContext) -> None:
        with preemption.signals_stop(context):
            _fit(trainer, context, train_dataloaders, val_dataloaders, datamodule, ckpt_path)

    return body, datamodule


def _fit(
    trainer: Trainer,
    context: RunContext,
    train_dataloaders: Any,
    val_dataloaders: Any,
    datamodule: DataModule | None,
    ckpt_path: Any,
) -> None:
    module = context.module
    accelerator = trainer.accelerator
    # The checkpoint is read and checked before anything changes (after setup, which
    # tells the checkpoint callback its folder).
    path = resolve_checkpoint(trainer, ckpt_path)
    checkpoint = trainer_checkpoint.read_for_fit(trainer, module, path) if path else None
    if datamodule is not None:  # its state first: it may decide the loaders it builds
        trainer_checkpoint.restore_datamodule(datamodule, checkpoint)
        train_dataloaders, val_dataloaders = fit_loaders(datamodule, None, None)
    if trainer.overfit_batches:
        train_dataloaders, val_dataloaders = run_control.overfit_loaders(
            train_dataloaders, val_dataloaders, overrides(module, "validation_step")
        )
    # Nothing left of an earlier fit's optimizer in the accelerator.
    accelerator.free_memory()
    context.prepare_module(trainer.compile, ("training_step", "validation_step"))
    context.train_loader, context.num_training_batches = prepare_train_loader(
        accelerator,
        train_dataloaders,
        trainer.limit_train_batches,
        trainer.val_check_interval,
        trainer.check_val_every_n_epoch,
        validates=val_dataloaders is not None
        and overrides(module, "validation_step")
        and trainer.limit_val_batches != 0,
        module=module,
    )
    if val_dataloaders is not None:
        context.val_loaders, context.num_val_batches = prepare_eval_loaders(
            accelerator,
            val_dataloaders,
            trainer.limit_val_batches,
            "validation",
            module=module,
        )
    if context.val_loaders and not overrides(module, "validation_step"):
        warnings.warn(
            f"fit() got validation loaders but {type(module).__name__} has no "
            "validation_step: validation is skipped. Define validation_step(batch, batch_idx) "
            "to validate.",
            UserWarning,
            stacklevel=3,
        )
    # After the loaders: configure_optimizers may read estimated_stepping_batches.
    context.prepare_optimizers()
    # Gradients left on the parameters before fit would be added into the first step;
    # a checkpoint written mid-window puts its window's gradient back just below.
    module.zero_grad(set_to_none=True)
    for optimizer in context.optimizers:
        optimizer.optimizer.zero_grad(set_to_none=True)
    if checkpoint is not None:
        trainer_checkpoint.restore(trainer, context, checkpoint)
    hparams = {**(datamodule.hparams if datamodule is not None else {}), **module.hparams}
    if hparams and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)
    try:
        loops.fit(context)
    except preemption.Preempted as stop:
        preemption.save_and_exit(trainer, context, stop.signal)


def evaluation_body(
    trainer: Trainer,
    entry: str,
    stage: str,
    module: TrainModule | None,
    dataloaders: Any,
    ckpt_path: str | os.PathLike[str] | None,
    datamodule: DataModule | None,
) -> tuple[Body, DataModule | None]:
    """Check ``validate`` / ``test``'s arguments (``entry``; ``stage``: "validation" or
    "test"), load the checkpoint's weights, and return the body and the ``DataModule``."""
    module = _checked_module(module, ckpt_path)
    if not overrides(module, f"{stage}_step"):
        raise MisconfigurationError(
            f"Trainer.{entry}() needs {type(module).__name__}.{stage}_step(batch, batch_idx)."
        )
    datamodule, (dataloaders,) = datamodule_of(entry, datamodule, dataloaders=dataloaders)
    limit = trainer.limit_val_batches if stage == "validation" else trainer.limit_test_batches

    def prepare() -> tuple[list[PreparedDataLoader], list[int | None]]:
        source = eval_loaders(
            entry, stage, datamodule if datamodule is not None else module, dataloaders
        )
        return prepare_eval_loaders(trainer.accelerator, source, limit, stage, module=module)

    # Given loaders are checked before the run; a DataModule's come after its setup.
    prepared = prepare() if datamodule is None else None
    load_weights(trainer, module, ckpt_path)

    def body(context: RunContext) -> list[dict[str, float]]:
        loaders, lengths = prepared if prepared is not None else prepare()
        if stage == "validation":
            context.num_val_batches = lengths
        else:
            context.num_test_batches = lengths
        context.prepare_module(trainer.compile, (f"{stage}_step",))
        return loops.evaluate(context, stage, loaders)

    return body, datamodule


def predict_body(
    trainer: Trainer,
    module: TrainModule | None,
    dataloaders: Any,
    ckpt_path: str | os.PathLike[str] | None,
    datamodule: DataModule | None,
) -> tuple[Body, DataModule | None]:
    """Check ``predict``'s arguments, load the checkpoint's weights, and return the body and
    the ``DataModule``."""
    module = _checked_module(module, ckpt_path)
    datamodule, (dataloaders,) = datamodule_of("predict", datamodule, dataloaders=dataloaders)
    limit = trainer.fast_dev_run or None

    def prepare() -> list[PreparedDataLoader]:
        source = eval_loaders(
            "predict", "predict", datamodule if datamodule is not None else module, dataloaders
        )
        loaders, _ = prepare_eval_loaders(
            trainer.accelerator, source, limit, "predict", module=module
        )
        return loaders

    # Given loaders are checked before the run; a DataModule's come after its setup.
    prepared = prepare() if datamodule is None else None
    load_weights(trainer, module, ckpt_path)

    def body(context: RunContext) -> list[Any]:
        loaders = prepared if prepared is not None else prepare()
        context.prepare_module(trainer.compile, ("predict_step",))
        return loops.predict(context, loaders)

    return body, datamodule


def _checked_module(module: TrainModule | None, ckpt_path: Any) -> TrainModule:
    arguments.check_module(module)
    assert module is not None
    arguments.check_ckpt_path(ckpt_path)
    return module
