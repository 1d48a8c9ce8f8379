"""The Trainer's checkpoints: what one holds, finding one, and putting it back.

``save`` gathers everything an exact continuation needs (weights, optimizers, schedulers,
grad scaler, loop progress, the training loader's position and the random state its epoch
began from, every process's RNG states, the gradient of an open accumulation window, callback
states, partially reduced epoch metrics, hparams, logger runs) and writes it with
``ember.checkpoint.files`` (atomic, ``weights_only``). ``read_for_fit`` reads and checks a
checkpoint before anything is changed; ``restore`` puts it back into a prepared run.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ember.accelerator import distributed
from ember.checkpoint.files import (
    Checkpoint,
    check_weights,
    complete_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from ember.checkpoint.plain import plain_hparams
from ember.checkpoint.rng import capture_rng
from ember.errors import CheckpointError, MisconfigurationError
from ember.trainer import run_control

if TYPE_CHECKING:
    from ember.datamodule import DataModule
    from ember.module import TrainModule
    from ember.trainer.context import RunContext
    from ember.trainer.trainer import Trainer

#: The layout of ``state.pt``; a checkpoint of another format is refused with a clear error.
FORMAT = 1
#: Keys of ``state.pt`` that ``restore`` reads; ``on_save_checkpoint`` may add others.
_FIT_KEYS = ("loop", "ranks", "optimizers", "schedulers", "scaler", "callbacks")
LAST_PREFIX = "last"


# --- writing -------------------------------------------------------------------------------------
def save(
    trainer: Trainer, context: RunContext, path: str | os.PathLike[str], weights_only: bool
) -> Path:
    """Write the run's checkpoint to ``path`` (every process calls this; global rank zero
    writes). Returns the path."""
    import ember

    accelerator = context.accelerator
    state = context.state
    model = context.model
    strategy = accelerator.strategy
    mid_window = state.accumulation_position != 0
    sharded = strategy.distributed_type.value == "FSDP"
    if mid_window and sharded:
        raise CheckpointError(
            f"Cannot write {str(path)!r} in the middle of an accumulation window under FSDP "
            f"(batch {state.batch_idx} of epoch {state.epoch}, {state.accumulation_position} "
            "batches into the window): save at a step boundary (with validation mid-epoch, a "
            "val_check_interval that is a multiple of accumulate_grad_batches)."
        )
    # A grad-scaler update still pending from the last step is applied now (it would be at
    # the next backward): the saved scale is the one the next step uses.
    accelerator.end_iteration()
    weights = strategy.full_state_dict(model)  # a collective under FSDP
    optimizers = [
        strategy.full_optimizer_state_dict(model, optimizer) for optimizer in context.optimizers
    ]
    # What differs between processes: every rank's RNG states, loader position, partial
    # epoch metrics, and the gradient still on the parameters (an open window's, local under
    # DDP until its last batch; under manual optimization, one carried between batches),
    # with the window's losses and item count.
    own: dict[str, Any] = {
        "rng": context.training_rng if context.training_rng is not None else capture_rng(),
        "loader": context.train_loader.state_dict() if context.train_loader is not None else None,
        "grads": None if weights_only or sharded else _local_gradients(context.module),
        # Restored but not yet taken up by the loop (a save before the first batch): as is.
        "metrics": {**context.train_metrics.state_dict(), **(context.resume_metrics or {})},
        "window": {
            "losses": [(index, float(loss.detach())) for index, loss in context.window_losses],
            "items": _plain_items(accelerator.gradient_state.item_total),
        },
    }
    ranks = distributed.all_gather_object(own) if accelerator.num_processes > 1 else [own]
    checkpoint: dict[str, Any] = {
        "format": FORMAT,
        "weights_only": weights_only,
        "hparams": plain_hparams(context.module.hparams),
        "loop": {
            **state.state_dict(),
            "epoch_finished": context.epoch_finished,
            # Written by on_train_batch_end or before a validation's values were ready: the
            # validation due after that batch still runs in the resumed fit.
            "batch_end": context.in_batch_end or context.validation_incomplete,
            # A stop asked before min_epochs / min_steps, still waiting for them.
            "held_stop": context.should_stop and not run_control.may_stop_early(context),
        },
        "world_size": accelerator.num_processes,
    }
    if not weights_only:
        checkpoint.update(
            optimizers=optimizers,
            optimizer_format=_optimizer_format(strategy),
            schedulers=[
                config.scheduler.scheduler.state_dict() for config in context.scheduler_configs
            ],
            scaler=accelerator.precision.state_dict(),
            ranks=ranks,
            callbacks={
                key: saved
                for key, saved in ((cb.state_key, cb.state_dict()) for cb in trainer.callbacks)
                if saved
            },
            loggers=[
                {"class": type(logger).__name__, "state": logger.checkpoint_state()}
                for logger in context.loggers
            ]
            if context.is_global_zero
            else [],
        )
    datamodule = trainer.datamodule
    if datamodule is not None:
        checkpoint["datamodule"] = datamodule.state_dict()
        checkpoint["datamodule_hparams"] = plain_hparams(datamodule.hparams)
    context.fire("on_save_checkpoint", checkpoint)
    meta = {
        "ember_version": ember.__version__,
        "epoch": state.epoch,
        "step": state.global_step,
        "batch_idx": state.batch_idx,
        "world_size": accelerator.num_processes,
        "weights_only": weights_only,
        "metrics": dict(context.train_metrics.latest()),
        "time": time.time(),
    }
    error: str | None = None
    path = Path(path)
    if context.is_global_zero:
        try:
            write_checkpoint(path, weights, checkpoint, meta)
        except Exception as failure:  # a full disk too: no peer may wait for rank 0
            error = f"{type(failure).__name__}: {failure}"
    if accelerator.num_processes > 1:  # every process learns whether it was written
        error = distributed.broadcast_object(error, src=0)
    if error is not None:
        raise CheckpointError(f"Writing the checkpoint {str(path)!r} failed: {error}")
    return path


def _local_gradients(module: TrainModule) -> dict[str, Tensor]:
    return {
        name: parameter.grad.detach().cpu().clone()
        for name, parameter in module.named_parameters()
        if parameter.grad is not None
    }


def _plain_items(items: Any) -> Any:
    if isinstance(items, Tensor):
        return items.detach().cpu()
    return items


def _optimizer_format(strategy: Any) -> str:
    # FSDP's full optimizer state is keyed by parameter names, the others' by position.
    return "names" if strategy.distributed_type.value == "FSDP" else "ids"


# --- finding -------------------------------------------------------------------------------------
def resolve(trainer: Trainer, ckpt_path: Any) -> Path | None:
    """The checkpoint ``fit`` / ``validate`` / ... should load: a path, ``"last"`` (the
    complete ``last-*`` checkpoint with the highest step; None with a warning when there is
    none yet) or ``"best"`` (the checkpoint callback's best)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        folder = _checkpoint_folder(trainer)
        found = complete_checkpoints(folder, LAST_PREFIX) if folder is not None else []
        if not found:
            where = f"in {str(folder)!r}" if folder is not None else "(checkpointing is off)"
            warnings.warn(
                f"ckpt_path='last': there is no complete 'last' checkpoint {where} yet; "
                "training starts from scratch.",
                UserWarning,
                stacklevel=4,
            )
            return None
        return found[-1]
    if ckpt_path == "best":
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best:
            raise MisconfigurationError(
                "ckpt_path='best': no best checkpoint is known (the checkpoint callback has "
                "not saved one with a `monitor` yet). Pass a path or ckpt_path='last'."
            )
        return Path(best)
    if isinstance(ckpt_path, (str, os.PathLike)):
        return Path(ckpt_path)
    raise MisconfigurationError(
        f"`ckpt_path={ckpt_path!r}` is not supported: pass a checkpoint directory, 'last' or "
        "'best' (or None)."
    )


def _checkpoint_folder(trainer: Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    folder = getattr(callback, "dirpath", None)
    # Before the callback's setup (validate / test before any fit): its default folder.
    return Path(folder) if folder is not None else Path(trainer.default_root_dir) / "checkpoints"


# --- reading -------------------------------------------------------------------------------------
def read_weights_for(module: TrainModule, path: Path) -> dict[str, Tensor]:
    """The weights of the checkpoint at ``path``, checked against ``module``'s keys and
    shapes."""
    checkpoint = read_checkpoint(path)
    assert checkpoint.weights is not None
    check_weights(path, module, checkpoint.weights, type(module).__name__)
    return checkpoint.weights


def read_for_fit(trainer: Trainer, module: TrainModule, path: Path) -> Checkpoint:
    """Read the checkpoint at ``path`` and check that fit can continue from it, before any
    state is changed."""
    checkpoint = read_checkpoint(path)
    assert checkpoint.weights is not None
    state = checkpoint.state
    if state.get("writer") is not None:
        raise CheckpointError(
            f"{str(path)!r} was written by {state['writer']}, not by a Trainer: load it with "
            "Accelerator.load_state, or its weights with validate/test(ckpt_path=...)."
        )
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} has state format {state.get('format')!r}; this ember reads "
            f"format {FORMAT}."
        )
    if state.get("weights_only"):
        raise CheckpointError(
            f"{str(path)!r} was saved with save_weights_only=True: it holds no optimizer or "
            "loop state to continue fit from. Load its weights with "
            f"{type(module).__name__}.load_from_checkpoint(path) or validate/test(ckpt_path=...)."
        )
    missing = [key for key in _FIT_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} is not a complete Trainer checkpoint: state.pt lacks {missing}."
        )
    check_weights(path, module, checkpoint.weights, type(module).__name__)
    parameters = {name for name, _ in module.named_parameters()}
    for saved in state["ranks"]:
        unknown = sorted(set(saved.get("grads") or {}) - parameters)
        if unknown:
            raise CheckpointError(
                f"{str(path)!r} holds gradients of parameters {type(module).__name__} does not "
                f"have: {unknown[:8]}."
            )
    world = trainer.world_size
    saved_world = int(state.get("world_size", 1))
    if state["loop"].get("accumulation_position", 0) and saved_world != world:
        raise CheckpointError(
            f"{str(path)!r} was written in the middle of an accumulation window by "
            f"{saved_world} processes; its gradient can only continue on {saved_world} "
            f"processes, not {world}. Resume from a checkpoint taken at a step boundary."
        )
    loop = state["loop"]
    if loop.get("batch_idx", 0) and not loop.get("epoch_finished") and saved_world != world:
        loader = state["ranks"][0].get("loader") or {}
        if "position" not in loader or loader.get("unit") is None:
            raise CheckpointError(
                f"{str(path)!r} was written mid-epoch by {saved_world} processes from a loader "
                f"whose global position is unknown (an iterable dataset, or a sampler of your "
                f"own); it continues mid-epoch on {saved_world} processes only, not {world}."
            )
    return checkpoint


def restore_datamodule(datamodule: DataModule, checkpoint: Checkpoint | None) -> None:
    """Put back the DataModule's state that ``checkpoint`` holds (nothing when it holds
    none: written without a DataModule)."""
    if checkpoint is not None and checkpoint.state.get("datamodule") is not None:
        datamodule.load_state_dict(checkpoint.state["datamodule"])


def restore(trainer: Trainer, context: RunContext, checkpoint: Checkpoint) -> None:
    """Put ``checkpoint`` back into the prepared run ``context`` (after ``read_for_fit``)."""
    state = checkpoint.state
    path = checkpoint.path
    accelerator = context.accelerator
    strategy = accelerator.strategy
    optimizers = state["optimizers"]
    schedulers = state["schedulers"]
    if len(optimizers) != len(context.optimizers) or len(schedulers) != len(
        context.scheduler_configs
    ):
        raise CheckpointError(
            f"{str(path)!r} holds {len(optimizers)} optimizer(s) and {len(schedulers)} "
            f"scheduler(s); configure_optimizers returned {len(context.optimizers)} and "
            f"{len(context.scheduler_configs)}."
        )
    if state.get("optimizer_format") != _optimizer_format(strategy):
        raise CheckpointError(
            f"{str(path)!r} was written under a strategy whose optimizer state is keyed by "
            f"{state.get('optimizer_format')}; this run's strategy ({strategy.distributed_type}) "
            "needs another layout. Resume under the strategy that wrote it."
        )
    for saved, optimizer in zip(optimizers, context.optimizers, strict=True):
        _check_groups(path, saved, optimizer)
    assert checkpoint.weights is not None
    strategy.load_full_state_dict(context.model, checkpoint.weights)
    for saved, optimizer in zip(optimizers, context.optimizers, strict=True):
        strategy.load_full_optimizer_state_dict(context.model, optimizer, saved)
    for saved, config in zip(schedulers, context.scheduler_configs, strict=True):
        config.scheduler.scheduler.load_state_dict(saved)
    accelerator.precision.load_state_dict(state["scaler"])
    loop = dict(state["loop"])
    epoch_finished = bool(loop.pop("epoch_finished", False))
    context.state.load_state_dict(loop)
    for callback in trainer.callbacks:
        saved = state["callbacks"].get(callback.state_key)
        if saved is not None:
            callback.load_state_dict(saved)
    rank = accelerator.process_index
    ranks = state["ranks"]
    own = ranks[rank] if rank < len(ranks) else None
    same_world = len(ranks) == accelerator.num_processes
    if own is not None:
        context.resume_rng = own["rng"]
    elif trainer.seed is not None:
        context.resume_seed = trainer.seed + rank
    # The latest values (callback_metrics) of the saving process: what an epoch-interval
    # ReduceLROnPlateau or a monitor reads before anything is logged again.
    context.resume_latest = (own or ranks[0])["metrics"].get("latest", {})
    context.resume_batch_end = bool(loop.get("batch_end", False)) and not epoch_finished
    context.should_stop = bool(loop.get("held_stop", False))
    loader = context.train_loader
    if epoch_finished:
        # Written at an epoch's end (before its epoch schedulers stepped): what is left of
        # that epoch's bookkeeping runs first, then the next epoch starts.
        context.pending_epoch_end = True
        # Its step values not sent yet (rank 0's: only it writes) wait for the next flush,
        # as in the uninterrupted run.
        context.resume_metrics = {"unflushed": ranks[0]["metrics"].get("unflushed", {})}
    if loader is not None and (epoch_finished or context.state.batch_idx == 0):
        # Between passes: the next epoch draws from the loader's own generators as saved.
        saved_loader = ranks[rank if same_world else 0]["loader"]
        if saved_loader is not None:
            loader.load_state_dict(saved_loader, batches=0)
    elif loader is not None:
        if same_world:
            saved_loader = ranks[rank]["loader"]
            if saved_loader is not None:
                loader.load_state_dict(saved_loader, batches=context.state.batch_idx)
            context.resume_metrics = ranks[rank]["metrics"]
        else:
            # Another number of processes: every process starts at the global position
            # of the epoch that the saved processes had reached together (read_for_fit
            # checked it is known), so no sample of the epoch comes twice or is missed.
            context.state.batch_idx = loader.load_state_dict(ranks[0]["loader"], by_position=True)
            context.resume_metrics = _merged_metrics(ranks, rank)
    if own is not None and own.get("grads"):
        _restore_gradients(context.module, own["grads"])
    # The open window's losses and item count, per process (a process restored from
    # another count starts with none: read_for_fit refused a window open there).
    window = (own or {}).get("window") or {}
    context.window_losses[:] = [
        (int(index), torch.tensor(loss)) for index, loss in window.get("losses", [])
    ]
    if window.get("items") is not None:
        items = window["items"]
        accelerator.gradient_state.item_total = (
            items.to(accelerator.device) if isinstance(items, Tensor) else items
        )
    # What the loggers keep: steps up to the checkpoint's. Written by on_train_batch_end,
    # nothing of its step had been sent yet (its flush, validation and epoch end come
    # after): the resumed run sends them again, so the logged rows of that step go too.
    kept_step = context.state.global_step - (1 if loop.get("batch_end") else 0)
    if context.is_global_zero:
        saved_loggers = state.get("loggers", [])
        for index, logger in enumerate(context.loggers):
            entry = saved_loggers[index] if index < len(saved_loggers) else None
            saved = entry["state"] if entry and entry.get("class") == type(logger).__name__ else {}
            logger.continue_run(saved, kept_step)
    context.fire("on_load_checkpoint", state)


def _merged_metrics(ranks: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The partial epoch values of every saved process, for a run on another number of
    processes: all of them on rank 0 (weights add up), none on the others; the latest
    values of saved rank 0 everywhere."""
    latest = ranks[0]["metrics"]
    merged: dict[str, Any] = {
        "latest": latest["latest"],
        "prog_bar": latest["prog_bar"],
        "unflushed": latest.get("unflushed", {}),
    }
    series: dict[str, dict[str, Any]] = {}
    if rank == 0:
        for saved in ranks:
            for item in saved["metrics"]["series"]:
                into = series.setdefault(item["key"], {**item, "values": [], "weights": []})
                into["values"] = into["values"] + list(item["values"])
                into["weights"] = into["weights"] + list(item["weights"])
    merged["series"] = list(series.values())
    return merged


def _check_groups(path: Path, saved: dict[str, Any], optimizer: Any) -> None:
    groups = saved.get("param_groups", [])
    current = optimizer.param_groups
    sizes = [len(group["params"]) for group in groups]
    expected = [len(group["params"]) for group in current]
    if sizes != expected:
        raise CheckpointError(
            f"{str(path)!r} holds an optimizer state for parameter groups of sizes {sizes}; "
            f"{type(optimizer.optimizer).__name__} here has groups of sizes {expected}."
        )


def _restore_gradients(module: TrainModule, grads: dict[str, Tensor]) -> None:
    parameters = dict(module.named_parameters())  # read_for_fit checked the names
    for name, grad in grads.items():
        parameter = parameters[name]
        parameter.grad = grad.to(device=parameter.device, dtype=parameter.dtype)
