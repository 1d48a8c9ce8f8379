"""``Accelerator.save_state`` / ``load_state``: what a hand-written loop needs to resume;
and the files of ``save``, ``save_model``.

A state directory is written with ``ember.checkpoint.files`` (atomically: complete or absent;
``state.pt`` loads with ``torch.load(weights_only=True)``) and holds:

- ``model.safetensors``: the first prepared model's full weights (plain safetensors).
- ``state.pt``:

  ========== ==========================================================================
  key        what
  ========== ==========================================================================
  format     the layout's number (``FORMAT``); ``writer`` says Accelerator.save_state
  world_size the number of processes that wrote it
  num_models how many models were prepared; ``models``: the full weights of all but
             the first, in the order they were prepared
  optimizers each prepared optimizer's full state (consolidated under FSDP)
  schedulers each prepared scheduler's ``state_dict()``
  scaler     the fp16 grad scaler's state, after its pending update (``{}`` otherwise)
  ranks      per process: ``rng`` (every generator's state) and ``loaders`` (each
             prepared loader's position in its epoch, the random state the epoch began
             from, and its sampler seed)
  objects    each registered object's ``state_dict()`` (the main process's)
  ========== ==========================================================================

- ``meta.json``: ember's version, the number of processes, the time.

``load_state`` reads and checks all of it before it changes anything. Every loader's next pass
then replays the saved epoch in the same order (``skip_first_batches`` leaves out what was
consumed), and each process draws its random numbers where it stopped.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ember.accelerator import distributed
from ember.checkpoint.files import (
    FILES,
    TEMPORARY_PREFIX,
    Checkpoint,
    check_weights,
    read_checkpoint,
    write_checkpoint,
)
from ember.checkpoint.plain import check_plain
from ember.checkpoint.rng import capture_rng, restore_rng
from ember.errors import CheckpointError, MisconfigurationError

if TYPE_CHECKING:
    from ember.accelerator.accelerator import Accelerator
    from ember.accelerator.data import PreparedDataLoader
    from ember.accelerator.optim import AcceleratedOptimizer, AcceleratedScheduler

#: The layout of ``state.pt`` (see the module docstring).
FORMAT = 1
WRITER = "Accelerator.save_state"
#: Automatic names: ``<project_dir>/checkpoints/checkpoint_<n>`` (as Accelerate's).
FOLDER = "checkpoints"
_NUMBERED = re.compile(r"checkpoint_(\d+)")


@dataclass(frozen=True)
class Tracked:
    """What an ``Accelerator`` prepared and registered, in order: what ``save_state`` saves
    and ``load_state`` restores (the accelerator hands it down explicitly)."""

    models: list[nn.Module]
    optimizers: list[AcceleratedOptimizer]
    schedulers: list[AcceleratedScheduler]
    dataloaders: list[PreparedDataLoader]
    objects: list[Any]


# --- saving --------------------------------------------------------------------------------------
def save_state(
    accelerator: Accelerator, tracked: Tracked, output_dir: str | os.PathLike[str] | None
) -> Path:
    """Write the state directory (every process calls this; the main process writes)."""
    import ember

    if not accelerator.sync_gradients:
        warnings.warn(
            "save_state was called inside an open accumulation window: the window's partial "
            "gradient is not saved, so a loop resumed from here differs from one that was "
            "never interrupted. Save after the window's optimizer step (when "
            "`accelerator.sync_gradients` is True).",
            UserWarning,
            stacklevel=3,
        )
    path = _output_path(accelerator, output_dir)
    strategy = accelerator.strategy
    models = tracked.models
    # The pending grad-scaler update is applied now (it would be at the next backward): the
    # saved scale is the one the next step uses.
    accelerator.end_iteration()
    weights = [strategy.full_state_dict(model) for model in models]  # collectives under FSDP
    optimizers = [
        strategy.full_optimizer_state_dict(_model_of(models, optimizer), optimizer)
        for optimizer in tracked.optimizers
    ]
    # What differs between processes: the random states and where each loader stands.
    own = {
        "rng": capture_rng(),
        "loaders": [loader.state_dict() for loader in tracked.dataloaders],
    }
    world_size = accelerator.num_processes
    ranks = distributed.all_gather_object(own) if world_size > 1 else [own]
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            objects = [_object_state(index, obj) for index, obj in enumerate(tracked.objects)]
            state = {
                "format": FORMAT,
                "writer": WRITER,
                "world_size": world_size,
                "num_models": len(models),
                "models": weights[1:],
                "optimizers": optimizers,
                "schedulers": [
                    scheduler.scheduler.state_dict() for scheduler in tracked.schedulers
                ],
                "scaler": accelerator.precision.state_dict(),
                "ranks": ranks,
                "objects": objects,
            }
            meta = {
                "ember_version": ember.__version__,
                "writer": WRITER,
                "world_size": world_size,
                "time": time.time(),
            }
            _check_replaceable(path)
            write_checkpoint(path, weights[0] if weights else {}, state, meta)
        except Exception as caught:  # a full disk too: the other processes must hear of it
            failure = caught
    if world_size > 1:  # every process learns whether it was written; none waits forever
        error = None if failure is None else f"{type(failure).__name__}: {failure}"
        error = distributed.broadcast_object(error, src=0)
        if failure is None and error is not None:
            raise CheckpointError(f"The main process could not write {str(path)!r}: {error}")
    if failure is not None:
        raise failure
    return path


def _output_path(accelerator: Accelerator, output_dir: str | os.PathLike[str] | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    folder = Path(accelerator.project_dir) / FOLDER
    taken = [int(match.group(1)) for match in map(_NUMBERED.fullmatch, _names(folder)) if match]
    path = folder / f"checkpoint_{max(taken) + 1 if taken else 0}"
    if accelerator.num_processes > 1:  # the main process's view of the folder decides
        path = Path(distributed.broadcast_object(str(path), src=0))
    return path


def _names(folder: Path) -> list[str]:
    return [entry.name for entry in folder.iterdir()] if folder.is_dir() else []


def _check_replaceable(path: Path) -> None:
    # write_checkpoint replaces the directory whole: never a folder holding anything else.
    if not path.exists():
        return
    if not path.is_dir():
        found = "it is a file"
    else:
        others = sorted(set(_names(path)) - set(FILES))
        if not others:
            return  # an earlier state directory (or an empty one): replaced whole
        found = f"it holds other files ({', '.join(others[:5])})"
    raise CheckpointError(
        f"save_state cannot write {str(path)!r}: {found}, and a state directory replaces "
        "what is at its path. Pass a new directory, or output_dir=None for "
        f"{FOLDER}/checkpoint_<n> under the accelerator's project_dir."
    )


def _model_of(models: list[nn.Module], optimizer: Any) -> nn.Module:
    """The prepared model whose parameters ``optimizer`` updates (FSDP names its state by
    that model's parameter names)."""
    owned = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    for model in models:
        if any(id(parameter) in owned for parameter in model.parameters()):
            return model
    return models[0] if models else nn.Module()


def _object_state(index: int, obj: Any) -> Any:
    state = obj.state_dict()
    check_plain(state, f"registered object {index} ({type(obj).__name__}).state_dict()")
    return state


# --- loading -------------------------------------------------------------------------------------
def load_state(
    accelerator: Accelerator, tracked: Tracked, input_dir: str | os.PathLike[str] | None
) -> Path:
    """Read, check, then restore a state directory; return its path."""
    path = Path(input_dir) if input_dir is not None else _newest(accelerator)
    checkpoint = read_checkpoint(path)
    _check(accelerator, tracked, checkpoint)
    state = checkpoint.state
    strategy = accelerator.strategy
    models = tracked.models
    # A scaler update left pending by this process's loop must not land on the loaded scale.
    accelerator.end_iteration()
    for model, weights in zip(models, _saved_weights(checkpoint), strict=True):
        strategy.load_full_state_dict(model, weights)
    for optimizer, saved in zip(tracked.optimizers, state["optimizers"], strict=True):
        strategy.load_full_optimizer_state_dict(_model_of(models, optimizer), optimizer, saved)
    for scheduler, saved in zip(tracked.schedulers, state["schedulers"], strict=True):
        scheduler.scheduler.load_state_dict(saved)
    accelerator.precision.load_state_dict(state["scaler"])
    own = state["ranks"][accelerator.process_index]
    for loader, saved in zip(tracked.dataloaders, own["loaders"], strict=True):
        saved = dict(saved)
        # The next pass replays the saved epoch whole; skip_first_batches leaves out the
        # batches already consumed (Accelerate's recipe).
        loader.load_state_dict(saved, batches=0)
    for obj, saved in zip(tracked.objects, state["objects"], strict=True):
        obj.load_state_dict(saved)
    restore_rng(own["rng"])  # last: nothing above may draw from the restored generators
    return path


def _saved_weights(checkpoint: Checkpoint) -> list[dict[str, Tensor]]:
    """Every saved model's weights, in the order the models were prepared."""
    if not checkpoint.state["num_models"]:
        return []
    assert checkpoint.weights is not None
    return [checkpoint.weights, *checkpoint.state["models"]]


def _newest(accelerator: Accelerator) -> Path:
    folder = Path(accelerator.project_dir) / FOLDER
    numbered = [
        (int(match.group(1)), folder / match.group(0))
        for match in map(_NUMBERED.fullmatch, _names(folder))
        if match
    ]
    if not numbered:
        raise CheckpointError(
            f"load_state() found no checkpoint_<n> directory in {str(folder)!r} (where "
            "save_state() writes by default). Pass the directory: load_state(input_dir)."
        )
    return max(numbered)[1]


def _check(accelerator: Accelerator, tracked: Tracked, checkpoint: Checkpoint) -> None:
    """``CheckpointError`` unless the checkpoint fits this accelerator exactly."""
    path = checkpoint.path
    where = repr(str(path))
    state = checkpoint.state
    if state.get("writer") != WRITER:
        raise CheckpointError(
            f"{where} was not written by Accelerator.save_state (a Trainer checkpoint resumes "
            "with Trainer.fit(ckpt_path=...); its weights load with "
            "TrainModule.load_from_checkpoint)."
        )
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{where} has state format {state.get('format')!r}; this ember reads format {FORMAT}."
        )
    saved_world = state.get("world_size")
    if saved_world != accelerator.num_processes:
        raise CheckpointError(
            f"{where} was written by {saved_world} processes and this run has "
            f"{accelerator.num_processes}: load_state restores each process's random state "
            f"and loader position, so it resumes on {saved_world} processes only. Launch "
            f"{saved_world} processes (ember launch --num_processes {saved_world})."
        )
    own = state["ranks"][accelerator.process_index]
    counts = [
        ("models", state["num_models"], len(tracked.models), "prepared"),
        ("optimizers", len(state["optimizers"]), len(tracked.optimizers), "prepared"),
        ("schedulers", len(state["schedulers"]), len(tracked.schedulers), "prepared"),
        ("data loaders", len(own["loaders"]), len(tracked.dataloaders), "prepared"),
        ("objects", len(state["objects"]), len(tracked.objects), "registered"),
    ]
    for what, saved, current, how in counts:
        if saved != current:
            raise CheckpointError(
                f"{where} holds the state of {saved} {how} {what}; this accelerator has "
                f"{current} {how}. Prepare and register the same objects, in the same "
                "order, as the run that saved it, before load_state."
            )
    for index, (model, weights) in enumerate(
        zip(tracked.models, _saved_weights(checkpoint), strict=True)
    ):
        module = accelerator.unwrap_model(model)
        check_weights(path, module, weights, f"prepared model {index} ({type(module).__name__})")
    for index, (optimizer, saved) in enumerate(
        zip(tracked.optimizers, state["optimizers"], strict=True)
    ):
        sizes = [len(group["params"]) for group in saved.get("param_groups", [])]
        expected = [len(group["params"]) for group in optimizer.param_groups]
        if sizes != expected:
            raise CheckpointError(
                f"{where} holds a state for optimizer {index} with parameter groups of sizes "
                f"{sizes}; {type(optimizer.optimizer).__name__} here has groups of sizes "
                f"{expected}."
            )


# --- registering and single files ----------------------------------------------------------------
def check_registrable(objects: tuple[Any, ...]) -> None:
    """``MisconfigurationError`` naming the types of objects without ``state_dict`` and
    ``load_state_dict`` methods."""
    invalid = [
        type(obj).__name__
        for obj in objects
        if not (
            callable(getattr(obj, "state_dict", None))
            and callable(getattr(obj, "load_state_dict", None))
        )
    ]
    if invalid:
        raise MisconfigurationError(
            "register_for_checkpointing takes objects with `state_dict()` and "
            f"`load_state_dict(state)` methods; these have not both: {', '.join(invalid)}. "
            "Give them those two methods (state_dict returning plain values: tensors, "
            "numbers, strings, lists and dicts)."
        )


def save_object(obj: Any, path: str | os.PathLike[str], safe_serialization: bool) -> None:
    """``torch.save(obj, path)`` (or safetensors), through a temporary file renamed into
    place: ``path`` holds the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}-{os.getpid()}")
    try:
        if safe_serialization:
            from ember.serialization import save_safetensors

            save_safetensors(obj, temporary, atomic=False)
        else:
            torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_model(
    accelerator: Accelerator, model: nn.Module, save_directory: str | os.PathLike[str]
) -> Path:
    """Write ``model``'s full weights to ``save_directory/model.safetensors`` from the main
    process (gathered from every shard under FSDP: every process calls it); return the path."""
    from ember.serialization import save_safetensors

    directory = Path(save_directory)
    path = directory / "model.safetensors"
    state_dict = accelerator.strategy.full_state_dict(model)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(state_dict, path)
    accelerator.wait_for_everyone()
    return path
