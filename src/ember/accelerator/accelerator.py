"""``Accelerator``: the one object a hand-written loop needs, and the layer the Trainer uses.

A loop in the style of Hugging Face Accelerate::

    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:                      # batches arrive on the device
        with accelerator.accumulate(model):   # sets sync_gradients for this batch
            with accelerator.autocast():
                loss = model(batch)
            accelerator.backward(loss)        # divided by the window's size, scaled for fp16
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()                  # a no-op until the window's last batch
            optimizer.zero_grad()

The composed pieces: a strategy (``strategies.py``: placement, process group), a precision
plugin (``precision.py``), a ``GradientState`` (``optim.py``) and prepared loaders (``data.py``).
The methods here are the public surface; the work is done where their comments point:
preparing objects and the record of them in ``preparing.py``, the optimizer step in
``step.py``, the collectives behind ``gather``, ``reduce`` and the rest in
``across_processes.py``, trackers in ``tracking.py``, state directories in ``checkpointing.py``.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ember.accelerator import across_processes, checkpointing, distributed, preparing
from ember.accelerator.data import PreparedDataLoader, skip_first_batches
from ember.accelerator.distributed import Agreement
from ember.accelerator.optim import AcceleratedOptimizer, AcceleratedScheduler, GradientState
from ember.accelerator.precision import (
    ACCELERATE_NAMES,
    Precision,
    create_precision,
    resolve_mixed_precision,
)
from ember.accelerator.preparing import Preparer
from ember.accelerator.step import OptimizerStep
from ember.accelerator.strategies import (
    AcceleratorState,
    DistributedType,
    pick_device,
    resolve_strategy,
)
from ember.accelerator.tracking import Tracker, Trackers
from ember.accelerator.transfer import DataLoaderConfiguration, TransferHooks
from ember.errors import MisconfigurationError

_NO_CONTEXT = nullcontext()


class Accelerator:
    """Device placement, distribution, mixed precision and gradient accumulation for any loop.

    Args:
        device_placement: move prepared modules and every batch to ``device``.
        mixed_precision: "no", "fp16" or "bf16" (Trainer names such as "bf16-true" work too).
            None reads ``EMBER_MIXED_PRECISION``, then the ``ember config`` file, then "no".
        gradient_accumulation_steps: batches per optimizer step inside ``accumulate``.
        cpu: run on the CPU even when an accelerator is present.
        dataloader_config: how loaders are prepared (``DataLoaderConfiguration``).
        strategy: "auto", "ddp", "fsdp" or a strategy object (``DDPStrategy``,
            ``FSDPStrategy``); several processes come from a launcher (``ember launch``,
            ``torchrun``).
        project_dir: the default folder for files the accelerator writes (kept as
            ``accelerator.project_dir``, the current directory when None): ``save_state()``
            writes ``checkpoints/`` there, trackers write ``<project_name>/`` there.
        step_scheduler_with_optimizer: prepared schedulers step only when their optimizer did.
        log_with: experiment trackers for ``init_trackers`` / ``log``: "tensorboard",
            "wandb", "csv", "all" (every installed one), an ``ember.loggers.Logger``, or a
            list of these (see ``tracking.py``).

    Examples:
        A loop that steps every two batches and logs the loss to ``demo/metrics.csv``:

        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> accelerator = ember.Accelerator(cpu=True, gradient_accumulation_steps=2, log_with="csv")
        >>> model = nn.Linear(3, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> loader = DataLoader(TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), batch_size=8)
        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        >>> accelerator.init_trackers("demo", config={"lr": 0.1})
        >>> step = 0
        >>> for x, y in loader:  # 4 batches: 2 windows of 2
        ...     with accelerator.accumulate(model):
        ...         loss = nn.functional.mse_loss(model(x), y)
        ...         accelerator.backward(loss)
        ...         optimizer.step()  # steps on the window's last batch only
        ...         optimizer.zero_grad()
        ...     if accelerator.sync_gradients:
        ...         accelerator.log({"loss": loss}, step=step)
        ...         step += 1
        >>> accelerator.end_training()
        >>> step, [tracker.name for tracker in accelerator.trackers]
        (2, ['csv'])
        >>> print(open("demo/metrics.csv").read())  # doctest: +ELLIPSIS
        step,loss
        0,...
        1,...
    """

    def __init__(
        self,
        *,
        device_placement: bool = True,
        mixed_precision: str | None = None,
        gradient_accumulation_steps: int = 1,
        cpu: bool = False,
        dataloader_config: DataLoaderConfiguration | None = None,
        strategy: Any = None,
        project_dir: str | os.PathLike[str] | None = None,
        step_scheduler_with_optimizer: bool = True,
        log_with: Any = None,
    ) -> None:
        if (
            not isinstance(gradient_accumulation_steps, int)
            or isinstance(gradient_accumulation_steps, bool)
            or gradient_accumulation_steps < 1
        ):
            raise MisconfigurationError(
                f"`gradient_accumulation_steps={gradient_accumulation_steps!r}` is not supported: "
                "it must be an integer >= 1 (1 means no accumulation)."
            )
        if dataloader_config is not None and not isinstance(
            dataloader_config, DataLoaderConfiguration
        ):
            raise MisconfigurationError(
                f"`dataloader_config` must be a DataLoaderConfiguration, got "
                f"{type(dataloader_config).__name__}."
            )
        self.strategy = resolve_strategy(strategy)
        device = self.strategy.requested_device
        if device is None:
            device = torch.device("cpu") if cpu else pick_device("auto", distributed.local_rank())
        # Joins the process group a launcher described (DDP / FSDP); one device: nothing.
        self.strategy.setup_environment(device)
        self.precision: Precision = create_precision(
            resolve_mixed_precision(mixed_precision), self.device
        )
        self.strategy.setup_precision(self.precision)  # FSDP's mixed-precision policy
        self.gradient_state = GradientState(gradient_accumulation_steps)
        self.device_placement = device_placement
        self.dataloader_config = dataloader_config or DataLoaderConfiguration()
        self.project_dir = Path(project_dir) if project_dir is not None else Path.cwd()
        self.step_scheduler_with_optimizer = step_scheduler_with_optimizer
        #: What was prepared and registered, in order: what ``save_state`` saves.
        self._tracked = checkpointing.Tracked([], [], [], [], [])
        #: The one place gradients are unscaled, normalised, clipped and stepped (``step.py``).
        self.optimizer_step = OptimizerStep(
            self.gradient_state, self.precision, self.strategy, self._tracked.optimizers
        )
        #: How each kind of object is prepared (``preparing.py``).
        self._preparer = Preparer(
            self.strategy, self.precision, self.gradient_state, self.optimizer_step, self._tracked
        )
        #: ``log_with``'s trackers; only the main process creates and writes them.
        self._trackers = Trackers(log_with, self.is_main_process)

    # --- facts ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return self.strategy.device

    @property
    def distributed_type(self) -> DistributedType:
        """How the processes share the work: ``NO``, ``MULTI_CPU``, ``MULTI_GPU`` or ``FSDP``."""
        return self.strategy.distributed_type

    @property
    def state(self) -> AcceleratorState:
        """The process facts in one read-only object (its ``repr`` is ready for a bug report)."""
        return AcceleratorState(
            distributed_type=self.distributed_type,
            num_processes=self.num_processes,
            process_index=self.process_index,
            local_process_index=self.local_process_index,
            device=self.device,
            mixed_precision=self.mixed_precision,
            backend=self.strategy.backend,
        )

    @property
    def mixed_precision(self) -> str:
        """The mode in force: "no", "fp16", "bf16" (or "bf16-true")."""
        return ACCELERATE_NAMES[self.precision.name]

    @property
    def pads_evaluation(self) -> bool:
        """Whether evaluation loaders must be padded so that every process runs as many
        batches: under FSDP with several processes, where every forward is a collective."""
        return self.strategy.pads_evaluation

    @property
    def num_processes(self) -> int:
        return self.strategy.world_size

    @property
    def process_index(self) -> int:
        return self.strategy.global_rank

    @property
    def local_process_index(self) -> int:
        return self.strategy.local_rank

    @property
    def is_main_process(self) -> bool:
        """True on the one process (over all machines) that writes logs and files."""
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        """True on one process per machine."""
        return self.local_process_index == 0

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.gradient_state.accumulation_steps

    @property
    def sync_gradients(self) -> bool:
        """Whether the current batch closes its accumulation window (the optimizer steps)."""
        return self.gradient_state.sync_gradients

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (fp16 found inf/NaN gradients)."""
        return any(optimizer.step_was_skipped for optimizer in self._tracked.optimizers)

    # --- prepare (``preparing.py``) ------------------------------------------------------------
    def prepare(self, *objects: Any) -> Any:
        """Prepare modules, optimizers, schedulers and data loaders; returned in the same order
        (a single object comes back alone, not in a tuple)."""
        return preparing.prepare_in_order(self, objects)

    def prepare_model(self, model: nn.Module, *, autocast_forward: bool = True) -> nn.Module:
        """Cast the weights for the precision and place (and later wrap) the module.

        Args:
            model: the module.
            autocast_forward: run its forward under the accelerator's autocast and return its
                low-precision float outputs as float32, as Accelerate does (mixed precision
                only). The Trainer passes False: it runs whole steps under autocast.
        """
        return self._preparer.model(
            model, autocast_forward=autocast_forward, place=self.device_placement
        )

    def prepare_steps(
        self, module: nn.Module, names: tuple[str, ...]
    ) -> tuple[nn.Module, dict[str, Callable[..., Any]]]:
        """For the Trainer: ``module`` placed and wrapped, and a callable per step name.

        Where the strategy wraps the module (DDP, FSDP), the training steps (and, under FSDP,
        the evaluation steps) run through the wrapper's ``forward``; otherwise each name is
        the module's own bound method. Nothing is autocast here: the loops run whole steps
        under ``autocast()``.
        """
        return self._preparer.steps(module, names, place=self.device_placement)

    def prepare_optimizer(self, optimizer: Optimizer) -> AcceleratedOptimizer:
        """Wrap ``optimizer`` so it steps at the end of each accumulation window."""
        return self._preparer.optimizer(optimizer)

    def prepare_scheduler(self, scheduler: Any) -> AcceleratedScheduler:
        """Wrap ``scheduler`` so it steps only when its optimizer really stepped."""
        return self._preparer.scheduler(
            scheduler,
            step_with_optimizer=self.step_scheduler_with_optimizer,
            split_batches=self.dataloader_config.split_batches,
        )

    def prepare_data_loader(
        self,
        data_loader: Any,
        max_batches: int | None = None,
        *,
        even_batches: bool | None = None,
        remember: bool = True,
        transfer_hooks: TransferHooks | None = None,
    ) -> PreparedDataLoader:
        """Wrap ``data_loader`` so batches arrive on the device and epochs are tracked; with
        several processes, shard it (each process gets its share of the global order).

        Args:
            data_loader: a ``DataLoader`` (or any iterable of batches).
            max_batches: end each pass after this many batches (of this process).
            even_batches: pad the last round so every process gets as many batches (None:
                the ``DataLoaderConfiguration``'s). The Trainer's evaluation loaders pass
                False: ranks may run different numbers of batches, none repeated.
            remember: keep it among what ``save_state`` saves (the Trainer's evaluation
                loaders, prepared at every ``validate``, pass False).
            transfer_hooks: batch-transfer hooks called on each batch around the device
                move (the Trainer passes its module's ``on_before_batch_transfer``,
                ``transfer_batch_to_device``, ``on_after_batch_transfer``).
        """
        return self._preparer.data_loader(
            data_loader,
            self.dataloader_config,
            max_batches,
            place=self.device_placement,
            even_batches=even_batches,
            remember=remember,
            transfer_hooks=transfer_hooks,
        )

    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> Any:
        """A loader that starts after the first ``num_batches`` batches (for resuming).

        A prepared loader's copy replays the same epoch's order (it shares the epoch) and,
        sharded, skips this process's first ``num_batches`` batches without loading them.
        """
        return skip_first_batches(dataloader, num_batches)

    # --- the step ----------------------------------------------------------------------------
    def autocast(self, cache_enabled: bool = True) -> AbstractContextManager[Any]:
        """The context for the forward pass (autocast under mixed precision, else nothing).

        ``cache_enabled=False`` when an optimizer steps inside the context: torch's autocast
        keeps the low-precision copy of each weight for the whole context, so a forward after
        the step would otherwise use the weights from before it.
        """
        return self.precision.autocast(cache_enabled)

    def accumulate(self, *models: nn.Module) -> AbstractContextManager[Any]:
        """Enter one batch of an accumulation window.

        Sets ``sync_gradients`` (True on the window's last batch, and on a loader's last
        batch) and, before that, keeps distributed backward from exchanging gradients.
        """
        if self.gradient_state.next_batch() or not models:
            return _NO_CONTEXT
        if len(models) == 1:
            return self.strategy.no_sync(models[0])
        stack = ExitStack()
        for model in models:
            stack.enter_context(self.strategy.no_sync(model))
        return stack

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """A context in which backward does not exchange gradients between processes."""
        return self.strategy.no_sync(model)

    def backward(self, loss: Tensor, num_items: Tensor | int | None = None, **kwargs: Any) -> None:
        """Backpropagate ``loss``.

        Without ``num_items`` the loss is divided by the number of batches in the window.
        With ``num_items``, ``loss`` is a sum over that many items (tokens, samples) and the
        gradient is divided, at the window's end, by the item count of the whole window over
        all processes: the update equals one big batch however items are spread.
        """
        self.optimizer_step.backward(loss, num_items, kwargs)

    def unscale_gradients(self, optimizer: Optimizer | None = None) -> None:
        """Unscale (fp16) and normalise the gradients of ``optimizer`` (default: every
        prepared optimizer) now; each gradient is prepared once, whoever asks first."""
        self.optimizer_step.unscale(optimizer)

    def end_iteration(self) -> None:
        """Apply what the loop iteration left pending (the grad scaler's update). ``backward``
        does it at the next iteration; call this before reading the scale after a loop."""
        self.optimizer_step.end_iteration()

    def clip_grad_norm_(
        self, parameters: Iterable[Tensor] | Tensor, max_norm: float, norm_type: float = 2.0
    ) -> Tensor:
        """Clip the gradient's total norm (after unscaling the optimizers that hold these
        parameters); return the norm before clipping."""
        return self.optimizer_step.clip_grad_norm_(parameters, max_norm, norm_type)

    def clip_grad_value_(self, parameters: Iterable[Tensor] | Tensor, clip_value: float) -> None:
        """Clamp every gradient element to ``[-clip_value, clip_value]`` (after unscaling)."""
        self.optimizer_step.clip_grad_value_(parameters, clip_value)

    # --- across processes (``across_processes.py``) ------------------------------------------
    def gather(self, tensor: Any) -> Any:
        """Every process's tensors concatenated on dim 0 (nested structures are followed)."""
        return across_processes.gather(self.strategy, tensor)

    def gather_for_metrics(self, obj: Any, *, use_gather_object: bool = False) -> Any:
        """Like ``gather``, minus the samples that even batching repeated in the last round:
        gathered over a prepared loader's epoch, the results hold each sample once.

        Tensors (nested in dicts, lists, tuples) are gathered along dim 0; other objects
        (or all, with ``use_gather_object``) with ``all_gather_object``, lists concatenated.
        """
        return across_processes.gather_for_metrics(
            self.strategy, self.gradient_state, obj, use_gather_object=use_gather_object
        )

    def reduce(self, tensor: Any, reduction: str = "mean") -> Any:
        """Reduce tensors over processes with "sum", "mean", "min" or "max"."""
        return across_processes.reduce(self.strategy, tensor, reduction)

    def pad_across_processes(
        self, tensor: Any, dim: int = 0, pad_index: int = 0, *, pad_first: bool = False
    ) -> Any:
        """Pad tensors along ``dim`` to the largest size over processes (so they can gather),
        with ``pad_index``, after the values (before them with ``pad_first``). Tensors too
        small to have ``dim`` are left alone."""
        return across_processes.pad_across_processes(
            self.strategy, tensor, dim, pad_index, pad_first=pad_first
        )

    def broadcast(self, obj: Any, from_process: int = 0) -> Any:
        """``obj`` as process ``from_process`` has it."""
        return self.strategy.broadcast(obj, from_process)

    def agreement(self) -> Agreement:
        """A flag the processes agree on without a blocking collective per step (the
        Trainer's stop): see ``distributed.Agreement``."""
        return Agreement(self.device)

    def wait_for_everyone(self) -> None:
        """Block until every process reaches this line."""
        self.strategy.barrier()

    def main_process_first(self) -> AbstractContextManager[None]:
        """Run the block on the main process first, then on the others (downloads, caches)."""
        return across_processes.main_process_first(self.strategy)

    def split_between_processes(self, inputs: Any) -> AbstractContextManager[Any]:
        """Give each process its contiguous share of a list, tuple, tensor or dict of them."""
        return across_processes.split_between_processes(self.strategy, inputs)

    def free_memory(self, *objects: Any) -> list[None]:
        """Forget every prepared module, optimizer, scheduler and loader and start a fresh gradient
        state, so the next ``prepare`` starts clean (the Trainer calls this at each ``fit``).

        Returns a ``None`` for each object passed, so ``model, opt = accelerator.free_memory(
        model, opt)`` drops your references too.
        """
        self._preparer.forget()
        return [None for _ in objects]

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main process only."""
        if self.is_main_process:
            builtins.print(*args, **kwargs)

    def end_training(self) -> None:
        """Apply a pending grad-scaler update, finish every tracker (main process) and wait
        for every process; call at the end of a script (a second call does nothing more)."""
        self.end_iteration()
        self._trackers.finish()
        self.wait_for_everyone()

    # --- tracking (``tracking.py``) ------------------------------------------------------------
    def init_trackers(
        self,
        project_name: str,
        config: dict[str, Any] | None = None,
        init_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Start the trackers of ``log_with`` under ``<project_dir>/<project_name>/`` (W&B:
        the project ``project_name``) and log ``config`` as hyperparameters.
        ``init_kwargs={"wandb": {...}}`` passes arguments to a tracker (``wandb.init``'s)."""
        self._trackers.start(self.project_dir, project_name, config, init_kwargs)

    def log(
        self,
        values: dict[str, Any],
        step: int | None = None,
        log_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Log numbers and one-element tensors at ``step`` on the main process (None: one
        after the last step logged, 0 first). ``log_kwargs={"wandb": {...}}`` goes to the
        underlying call (W&B's ``run.log``, TensorBoard's ``add_scalar``)."""
        self._trackers.log(values, step, log_kwargs)

    def get_tracker(self, name: str, unwrap: bool = False) -> Any:
        """The active tracker ``name`` ("tensorboard", "wandb", "csv", or a custom logger's
        class name); ``unwrap=True``: its underlying ``SummaryWriter``, W&B run or logger. On
        other processes than the main one, a tracker on which everything does nothing."""
        return self._trackers.get(name, unwrap)

    @property
    def trackers(self) -> list[Tracker]:
        """The trackers ``init_trackers`` started (each with ``.tracker`` and ``.logger``)."""
        return list(self._trackers.active)

    # --- models and files --------------------------------------------------------------------
    # (``checkpointing.py`` says what a state directory holds.)
    def save_state(self, output_dir: str | os.PathLike[str] | None = None) -> Path:
        """Write everything a loop needs to resume to the directory ``output_dir`` (atomically;
        call it on every process, at a window boundary): prepared models, optimizers,
        schedulers and loaders, the grad scaler, every process's RNG states, registered
        objects. None: ``<project_dir>/checkpoints/checkpoint_<n>``, the next free ``n``.
        Returns the directory."""
        return checkpointing.save_state(self, self._tracked, output_dir)

    def load_state(self, input_dir: str | os.PathLike[str] | None = None) -> Path:
        """Restore what ``save_state`` wrote into the objects prepared and registered in the
        same order (None: the newest ``checkpoints/checkpoint_<n>``); everything is checked
        first (``CheckpointError``). Each loader's next pass replays the saved epoch: give
        ``skip_first_batches(loader, consumed)`` to continue it. Returns the directory."""
        return checkpointing.load_state(self, self._tracked, input_dir)

    def register_for_checkpointing(self, *objects: Any) -> None:
        """Add objects with ``state_dict()`` and ``load_state_dict()`` to what ``save_state``
        saves and ``load_state`` restores (in the order registered)."""
        checkpointing.check_registrable(objects)
        self._tracked.objects.extend(objects)

    def save(
        self, obj: Any, path: str | os.PathLike[str], safe_serialization: bool = False
    ) -> None:
        """``torch.save(obj, path)`` on the main process, atomically (a temporary file
        renamed into place); ``safe_serialization``: a dict of tensors as safetensors."""
        if self.is_main_process:
            checkpointing.save_object(obj, path, safe_serialization)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """The user's module, without the distributed or compile wrappers."""
        return self.strategy.unwrap_module(model)

    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict[str, Tensor]:
        """The module's full weights, without wrapper prefixes. Under FSDP they are gathered
        from every shard (call it on every process) onto the CPU of the main process; the
        other processes get an empty dict. ``unwrap=False``: the prepared module's own
        ``state_dict()`` (sharded DTensors under FSDP)."""
        if not unwrap:
            return model.state_dict()
        return self.strategy.full_state_dict(model)

    def save_model(self, model: nn.Module, save_directory: str | os.PathLike[str]) -> Path:
        """Write the module's full weights to ``save_directory/model.safetensors`` (from the
        main process; under FSDP consolidated from every shard, so call it on every process).
        Plain ``safetensors.torch.load_file`` reads it back."""
        return checkpointing.save_model(self, model, save_directory)
