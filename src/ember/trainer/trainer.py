"""``Trainer``: takes a ``TrainModule`` and data loaders and runs fit / validate / test / predict.

The Trainer checks its arguments, owns the ``Accelerator`` (device, precision, accumulation),
the callbacks and the loggers, and keeps the current run, which its read-only properties
read. Each call's set-up and tear-down are in ``runs.py``; the loop itself is in ``loops.py``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from ember.accelerator.accelerator import Accelerator, resolve_mixed_precision
from ember.accelerator.optim import AcceleratedOptimizer
from ember.accelerator.precision import canonical_precision
from ember.accelerator.transfer import DataLoaderConfiguration
from ember.datamodule import DataModule
from ember.errors import MisconfigurationError
from ember.hooks import Callback, collect_hooks
from ember.loggers.base import Logger
from ember.module import TrainModule
from ember.seed import seed_everything
from ember.trainer import arguments, profiling, run_control, runs
from ember.trainer import checkpoint as trainer_checkpoint
from ember.trainer.context import RunContext
from ember.trainer.logging import MetricStore
from ember.trainer.optimizers import SchedulerConfig
from ember.trainer.state import LoopState

_NONFINITE_MODES = ("raise", "skip")
_CLIP_ALGORITHMS = ("norm", "value")


class Trainer:
    """Runs the training loop of a ``TrainModule``.

    Args:
        max_epochs: stop after this many epochs (-1: no limit). With neither this nor
            ``max_steps``, training runs 1000 epochs.
        max_steps: stop after this many optimizer steps (-1: no limit).
        accelerator: "auto", "cpu", "cuda" (or "gpu", the same) or "mps".
        devices: "auto", a count, or a list of device indices: processes on this machine.
            N > 1 from plain ``python script.py`` starts the other N - 1 processes.
        strategy: "auto", "ddp", "fsdp", or a ``DDPStrategy`` / ``FSDPStrategy``.
        num_nodes: machines taking part (> 1: ``ember launch`` on each machine).
        precision: "32-true", "16-mixed", "bf16-mixed" or "bf16-true"; None takes
            ``EMBER_MIXED_PRECISION``, then the ``ember config`` file, then "32-true".
        accumulate_grad_batches: batches per optimizer step.
        gradient_clip_val: clip the gradient of every parameter the optimizer updates, at
            each step (None or 0: no clipping).
        gradient_clip_algorithm: "norm" (total norm) or "value" (each element).
        val_check_interval: validate after this fraction of the epoch (float) or every this
            many training batches (int).
        check_val_every_n_epoch: validate in every n-th epoch (None: count batches over epochs).
        limit_train_batches: use only this many batches (int) or this fraction (float) of
            the training loader, in every epoch.
        limit_val_batches: the same for each validation loader (0: no validation).
        limit_test_batches: the same for each test loader.
        num_sanity_val_steps: validation batches run before training (-1: all, 0: none).
        log_every_n_steps: send step metrics to the loggers every n optimizer steps.
        callbacks: a ``Callback`` or a list of them.
        logger: True (TensorBoard when installed, else CSV), False, a ``Logger`` or a list.
        enable_checkpointing: add ``ModelCheckpoint(save_last=True)`` unless ``callbacks``
            holds one (False: save no checkpoints; passing one too is an error).
        enable_progress_bar: add a ``ProgressBar`` unless one is given.
        default_root_dir: where logs and checkpoints go (default: the working directory).
        seed: call ``seed_everything(seed)`` now.
        deterministic: use deterministic algorithms (True, False or "warn").
        dataloader_config: how loaders are prepared (``DataLoaderConfiguration``).
        compile: ``torch.compile`` the module's steps (``training_step``, ``validation_step``,
            ``test_step``, ``predict_step``): True, or a dict of ``torch.compile`` arguments.
        on_nonfinite_loss: "raise" (stop, naming the step and batch) or "skip" (drop the
            update, counted in the logged metric ``skipped_steps``).
        min_epochs: a stop asked through ``should_stop`` (EarlyStopping, ``max_time``)
            before this many epochs have run waits until they have (as it does for
            ``min_steps``: until both are reached); ``max_epochs`` / ``max_steps`` still end fit.
        min_steps: the same for optimizer steps.
        max_time: stop at the first step boundary after this much time since fit started:
            "DD:HH:MM:SS", a ``timedelta`` or a dict of ``timedelta`` arguments.
        fast_dev_run: True (1) or n: run n batches of train, val, test and predict, once,
            without sanity check, loggers, checkpoints, early stopping or model summary.
        overfit_batches: train on the first n batches (int) or fraction (float) of the
            training loader, unshuffled, and validate on those same batches (0: off).
        enable_model_summary: add a ``ModelSummary`` (a table of layers and parameter counts
            printed at fit start) unless one is given.
        profiler: None, "simple" (a table of where each training step's time goes, printed
            at the end of fit and logged as ``profiler/<part>_share``), "pytorch" (a
            ``torch.profiler`` trace of a few steps in ``<log_dir>/profiler``) or a
            ``ember.profilers.SimpleProfiler`` / ``PyTorchProfiler``; see
            [Profiling](../profiling.md).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> class Regression(ember.TrainModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.layer = nn.Linear(3, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.mse_loss(self.layer(x), y)
        ...
        ...     def validation_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         self.log("val_loss", nn.functional.mse_loss(self.layer(x), y))
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> x = torch.randn(64, 3)
        >>> data = TensorDataset(x, x.sum(dim=1, keepdim=True))
        >>> trainer = ember.Trainer(max_epochs=3, logger=False, enable_progress_bar=False,
        ...                         enable_model_summary=False)  # checkpoints/ in the cwd
        >>> module = Regression()
        >>> trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=64))
        >>> trainer.global_step, trainer.current_epoch  # 3 epochs of 4 batches
        (12, 3)
        >>> [sorted(metrics) for metrics in trainer.validate(module, DataLoader(data))]
        [['val_loss']]
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int = -1,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        strategy: str = "auto",
        num_nodes: int = 1,
        precision: str | int | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        val_check_interval: int | float = 1.0,
        check_val_every_n_epoch: int | None = 1,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        num_sanity_val_steps: int = 2,
        log_every_n_steps: int = 50,
        callbacks: Callback | list[Callback] | None = None,
        logger: bool | Logger | list[Logger] | None = True,
        enable_checkpointing: bool = True,
        enable_progress_bar: bool = True,
        default_root_dir: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        deterministic: bool | str = False,
        dataloader_config: DataLoaderConfiguration | None = None,
        compile: bool | dict[str, Any] = False,
        on_nonfinite_loss: str = "raise",
        min_epochs: int | None = None,
        min_steps: int | None = None,
        max_time: str | timedelta | dict[str, float] | None = None,
        fast_dev_run: bool | int = False,
        overfit_batches: int | float = 0.0,
        enable_model_summary: bool = True,
        profiler: str | profiling.Profiler | None = None,
    ) -> None:
        self.max_epochs = arguments.check_count("max_epochs", max_epochs, allow_none=True)
        self.max_steps = arguments.check_count("max_steps", max_steps)
        self.min_epochs = run_control.check_minimum("min_epochs", min_epochs)
        self.min_steps = run_control.check_minimum("min_steps", min_steps)
        self.max_time = run_control.parse_max_time(max_time)
        if self.max_epochs is None:
            self.max_epochs = 1000 if self.max_steps == -1 and self.max_time is None else -1
        self.accumulate_grad_batches = arguments.check_positive(
            "accumulate_grad_batches", accumulate_grad_batches
        )
        self.gradient_clip_val = arguments.check_clip_value(gradient_clip_val)
        self.gradient_clip_algorithm = arguments.check_choice(
            "gradient_clip_algorithm", gradient_clip_algorithm, _CLIP_ALGORITHMS
        )
        self.val_check_interval = arguments.check_val_check_interval(val_check_interval)
        self.check_val_every_n_epoch = arguments.check_positive(
            "check_val_every_n_epoch", check_val_every_n_epoch, allow_none=True
        )
        if self.check_val_every_n_epoch is None and not isinstance(self.val_check_interval, int):
            raise MisconfigurationError(
                "`check_val_every_n_epoch=None` counts batches over epochs and needs an integer "
                f"`val_check_interval` (got {val_check_interval!r})."
            )
        self.limit_train_batches = arguments.check_limit("limit_train_batches", limit_train_batches)
        self.limit_val_batches = arguments.check_limit("limit_val_batches", limit_val_batches)
        self.limit_test_batches = arguments.check_limit("limit_test_batches", limit_test_batches)
        self.num_sanity_val_steps = arguments.check_count(
            "num_sanity_val_steps", num_sanity_val_steps, meaning_of_minus_one="every batch"
        )
        self.log_every_n_steps = arguments.check_positive("log_every_n_steps", log_every_n_steps)
        #: Batches of each loop under ``fast_dev_run`` (0: off).
        self.fast_dev_run = run_control.check_fast_dev_run(fast_dev_run)
        self.overfit_batches = run_control.check_overfit_batches(overfit_batches)
        if self.overfit_batches:  # the first batches, for training and validation alike
            self.limit_train_batches = self.limit_val_batches = self.overfit_batches
        if self.fast_dev_run:  # n batches of train / val / test, once (Lightning's settings)
            batches = self.fast_dev_run
            self.limit_train_batches = self.limit_val_batches = self.limit_test_batches = batches
            self.max_steps, self.max_epochs, self.num_sanity_val_steps = batches, 1, 0
            self.val_check_interval, self.check_val_every_n_epoch = 1.0, 1
        self.on_nonfinite_loss = arguments.check_choice(
            "on_nonfinite_loss", on_nonfinite_loss, _NONFINITE_MODES
        )
        self.compile = arguments.check_compile(compile)
        self.default_root_dir = (
            arguments.check_directory("default_root_dir", default_root_dir)
            if default_root_dir is not None
            else Path.cwd()
        )
        self.enable_checkpointing = arguments.check_flag(
            "enable_checkpointing", enable_checkpointing
        )
        arguments.check_flag("enable_progress_bar", enable_progress_bar)

        #: The run's seed (a process resumed without saved RNG states is seeded from it).
        self.seed = seed
        if seed is not None:
            seed_everything(seed)
        arguments.set_deterministic(deterministic)
        # None: EMBER_MIXED_PRECISION, then the `ember config` file, then "32-true".
        precision_name = (
            canonical_precision(precision)
            if precision is not None
            else resolve_mixed_precision(None)
        )
        self.accelerator = Accelerator(
            mixed_precision=precision_name,
            gradient_accumulation_steps=self.accumulate_grad_batches,
            dataloader_config=dataloader_config,
            strategy=arguments.resolve_strategy_and_device(
                accelerator, devices, num_nodes, strategy
            ),
            project_dir=self.default_root_dir,
        )
        self.callbacks = arguments.resolve_callbacks(
            callbacks, enable_progress_bar, self.enable_checkpointing
        )
        self.callbacks = run_control.with_model_summary(self.callbacks, enable_model_summary)
        self.loggers = arguments.resolve_loggers(logger, self.default_root_dir)
        if self.fast_dev_run:  # nothing written: no loggers, checkpoints or early stopping
            self.loggers = []
            self.callbacks = run_control.without_writers(self.callbacks)
        self.profiler = profiling.resolve(profiler)

        #: The current or last run; None before the first fit / validate / test / predict.
        self._context: RunContext | None = None
        self._datamodule: DataModule | None = None

    # --- read-only state (from the current or last run) ---------------------------------------
    @property
    def module(self) -> TrainModule:
        """The module being run."""
        if self._context is None:
            raise MisconfigurationError(
                "The Trainer has no module yet: call fit/validate/test first."
            )
        return self._context.module

    @property
    def state(self) -> LoopState:
        """Loop progress (``LoopState``): epoch, global step, batch position, stage."""
        return self._context.state if self._context is not None else LoopState()

    @property
    def datamodule(self) -> DataModule | None:
        """The ``DataModule`` of the current or last run (None when it had none)."""
        return self._datamodule

    @property
    def global_step(self) -> int:
        """Optimizer steps taken."""
        return self.state.global_step

    @property
    def current_epoch(self) -> int:
        """The epoch being run (the number of finished epochs)."""
        return self.state.epoch

    @property
    def sanity_checking(self) -> bool:
        """Whether the validation sanity check before training is running."""
        return self.state.sanity_checking

    @property
    def should_stop(self) -> bool:
        """Set to True (from a callback or the module) to end fit after the current step."""
        return self._context is not None and self._context.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        # Outside a run there is nothing to stop: every fit starts with should_stop False.
        if self._context is not None:
            self._context.should_stop = bool(value)

    @property
    def callback_metrics(self) -> dict[str, float]:
        """The latest value of every logged name (and "loss")."""
        return self._context.train_metrics.latest() if self._context is not None else {}

    @property
    def logged_metrics(self) -> dict[str, float]:
        """The latest values sent to the loggers."""
        return self._context.logged_metrics if self._context is not None else {}

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """The latest values logged with ``prog_bar=True``."""
        if self._context is None:
            return {}
        return self._context.train_metrics.progress_bar_metrics()

    @property
    def run_context(self) -> RunContext:
        """The current run (``RunContext``): what ``TrainModule.manual_backward`` and
        ``clip_gradients`` act through."""
        if self._context is None:
            raise MisconfigurationError(
                "The Trainer has no run yet: manual_backward and clip_gradients work inside "
                "Trainer.fit."
            )
        return self._context

    @property
    def metric_store(self) -> MetricStore:
        """Where ``TrainModule.log`` records values now: the training store during training,
        the evaluation store while validation or test runs."""
        assert self._context is not None, "a module is attached to a Trainer only by a run"
        return self._context.active_metrics

    @property
    def last_eval_metrics(self) -> dict[str, float]:
        """What the last validation / test run logged (also in ``callback_metrics``)."""
        return self._context.last_eval_metrics if self._context is not None else {}

    @property
    def num_training_batches(self) -> int | None:
        """Training batches per epoch (None: the loader's length is not certain)."""
        return self._context.num_training_batches if self._context is not None else None

    @property
    def num_val_batches(self) -> list[int | None]:
        """Batches of each validation loader (None: unknown)."""
        return self._context.num_val_batches if self._context is not None else []

    @property
    def num_test_batches(self) -> list[int | None]:
        """Batches of each test loader (None: unknown)."""
        return self._context.num_test_batches if self._context is not None else []

    @property
    def estimated_stepping_batches(self) -> int | float:
        """The optimizer steps the whole fit will take (for warm-up and one-cycle schedules;
        usable in ``configure_optimizers``): this process's training batches per epoch (after
        ``limit_train_batches`` and sharding) in windows of ``accumulate_grad_batches`` (a
        short last window counts), times ``max_epochs``, capped by ``max_steps``.
        ``float("inf")`` when it cannot be known (no loader length, no limit)."""
        context = self._context
        if context is None or context.train_loader is None:
            raise MisconfigurationError(
                "Trainer.estimated_stepping_batches is known once fit has prepared the training "
                "loader: read it in configure_optimizers or later during fit."
            )
        return run_control.estimated_stepping_batches(
            context.train_loader.known_length(),
            self.accumulate_grad_batches,
            self.max_epochs,
            self.max_steps,
        )

    @property
    def enable_validation(self) -> bool:
        """Whether fit validates: it has validation loaders, a validation_step and a
        non-zero ``limit_val_batches``."""
        return self._context is not None and self._context.validation_enabled

    @property
    def is_global_zero(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def logger(self) -> Logger | None:
        """The first logger, or None."""
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        """The first logger's folder, else ``default_root_dir``."""
        for logger in self.loggers:
            if logger.log_dir is not None:
                return logger.log_dir
        return str(self.default_root_dir)

    @property
    def checkpoint_callback(self) -> Callback | None:
        """The first checkpointing callback, or None."""
        return next((cb for cb in self.callbacks if hasattr(cb, "best_model_path")), None)

    @property
    def progress_bar_callback(self) -> Callback | None:
        """The progress bar callback, or None."""
        from ember.callbacks.progress import ProgressBar

        return next((cb for cb in self.callbacks if isinstance(cb, ProgressBar)), None)

    @property
    def optimizers(self) -> list[AcceleratedOptimizer]:
        """The prepared optimizers of the last fit."""
        return list(self._context.optimizers) if self._context is not None else []

    @property
    def lr_scheduler_configs(self) -> list[SchedulerConfig]:
        """The prepared schedulers of the last fit and when the loop steps them."""
        return list(self._context.scheduler_configs) if self._context is not None else []

    # --- entry points (``runs.py`` sets up and tears down each run) ---------------------------
    def fit(
        self,
        module: TrainModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: DataModule | None = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Train ``module`` on ``train_dataloaders``, validating on ``val_dataloaders``.

        ``datamodule``: take the loaders from this ``DataModule`` instead (also accepted in
        place of ``train_dataloaders``); giving loaders too is an error.

        ``ckpt_path``: continue from a checkpoint (a path, ``"last"`` or ``"best"``) exactly
        where it was written. A process restarted by torchrun (``TORCHELASTIC_RESTART_COUNT``
        > 0) given None continues from ``"last"``.
        """
        body, datamodule = runs.fit_body(
            self, module, train_dataloaders, val_dataloaders, datamodule, ckpt_path
        )
        self._run("fit", module, body, new_run=True, datamodule=datamodule)

    def validate(
        self,
        module: TrainModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        datamodule: DataModule | None = None,
    ) -> list[dict[str, float]]:
        """Run ``validation_step`` over ``dataloaders`` (or those of ``datamodule``); one dict of
        metrics per loader."""
        return self._evaluate("validate", "validation", module, dataloaders, ckpt_path, datamodule)

    def test(
        self,
        module: TrainModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        datamodule: DataModule | None = None,
    ) -> list[dict[str, float]]:
        """Run ``test_step`` over ``dataloaders`` (or those of ``datamodule``); one dict of
        metrics per loader."""
        return self._evaluate("test", "test", module, dataloaders, ckpt_path, datamodule)

    def predict(
        self,
        module: TrainModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        datamodule: DataModule | None = None,
    ) -> list[Any]:
        """Run ``predict_step`` over ``dataloaders`` (or those of ``datamodule``) and return
        its outputs in order."""
        module = module if module is not None else self._last_module()
        body, datamodule = runs.predict_body(self, module, dataloaders, ckpt_path, datamodule)
        assert module is not None  # checked by predict_body
        result: list[Any] = self._run("predict", module, body, new_run=False, datamodule=datamodule)
        return result

    def save_checkpoint(self, path: str | os.PathLike[str], weights_only: bool = False) -> Path:
        """Write a checkpoint directory at ``path`` (atomically: complete or absent) from
        which ``fit(ckpt_path=path)`` continues exactly; call it on every process.

        Args:
            path: the checkpoint directory to write (replaced when it exists).
            weights_only: keep only the weights, hparams and progress (no optimizer, loop
                position or RNG states): enough for ``load_from_checkpoint``, not to resume.
        """
        if self._context is None:
            raise MisconfigurationError(
                "Trainer.save_checkpoint needs a module: call it during or after fit (or "
                "validate / test)."
            )
        return trainer_checkpoint.save(self, self._context, path, bool(weights_only))

    # --- the current run ------------------------------------------------------------------------
    def _run(
        self,
        stage: str,
        module: TrainModule,
        body: runs.Body,
        new_run: bool,
        datamodule: DataModule | None = None,
    ) -> Any:
        """Make a new run of ``module`` the current one and run ``body`` in it (``runs.run``:
        setup, teardown). ``new_run``: fit starts afresh; evaluation continues the last run."""
        context = runs.new_context(self, module, stage, None if new_run else self._context)
        self._context = context
        self._datamodule = datamodule
        object.__setattr__(module, "_trainer", self)
        self.callbacks = arguments.merge_module_callbacks(self.callbacks, module)
        if self.fast_dev_run:  # the module's own writers are left out too
            self.callbacks = run_control.without_writers(self.callbacks)
        context.hooks = collect_hooks(self.callbacks, module, self, self.profiler.timed_hooks)
        return runs.run(self, context, stage, body, datamodule)

    def _last_module(self) -> TrainModule | None:
        return self._context.module if self._context is not None else None

    def _evaluate(
        self,
        entry: str,
        stage: str,
        module: TrainModule | None,
        dataloaders: Any,
        ckpt_path: str | os.PathLike[str] | None,
        datamodule: DataModule | None = None,
    ) -> list[dict[str, float]]:
        module = module if module is not None else self._last_module()
        body, datamodule = runs.evaluation_body(
            self, entry, stage, module, dataloaders, ckpt_path, datamodule
        )
        assert module is not None  # checked by evaluation_body
        result: list[dict[str, float]] = self._run(
            entry, module, body, new_run=False, datamodule=datamodule
        )
        return result
