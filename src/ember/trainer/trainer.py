"""``Trainer``: takes a ``TrainModule`` and data loaders and runs fit / validate / test / predict.

The Trainer checks its arguments, owns the ``Accelerator`` (device, precision, accumulation),
the callbacks and the loggers, and hands the loop itself to ``loops.py``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from ember.accelerator import distributed
from ember.accelerator.accelerator import Accelerator, resolve_mixed_precision
from ember.accelerator.data import PreparedDataLoader
from ember.accelerator.optim import AcceleratedOptimizer
from ember.accelerator.precision import canonical_precision
from ember.accelerator.transfer import DataLoaderConfiguration
from ember.datamodule import DataModule
from ember.errors import MisconfigurationError
from ember.hooks import Callback, collect_hooks
from ember.loggers.base import Logger
from ember.loggers.lifecycle import end_call as end_logger_call
from ember.loggers.lifecycle import start_call as start_logger_call
from ember.module import TrainModule, overrides
from ember.seed import seed_everything
from ember.trainer import arguments, loops, preemption, profiling, run_control
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
        limit_train_batches / limit_val_batches / limit_test_batches: use only this many
            batches (int) or this fraction (float) of each loader.
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
        min_epochs / min_steps: a stop asked through ``should_stop`` (EarlyStopping,
            ``max_time``) before both are reached waits until they are; ``max_epochs`` /
            ``max_steps`` still end fit.
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
            ``SimpleProfiler`` / ``PyTorchProfiler``; see ``docs/profiling.md``.
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
        self.profiler = profiling.resolve(profiler, lambda: Path(self.log_dir) / "profiler")

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

    # --- entry points ------------------------------------------------------------------------
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
        arguments.check_fit_module(module)
        arguments.check_ckpt_path(ckpt_path)
        if ckpt_path is None and distributed.restart_count() > 0:
            ckpt_path = "last"  # a restarted group continues from its newest checkpoint
        datamodule, (train_dataloaders, val_dataloaders) = datamodule_of(
            "fit", datamodule, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders
        )
        if datamodule is None:  # a DataModule's loaders come after its setup, in _fit
            train_dataloaders, val_dataloaders = fit_loaders(
                module, train_dataloaders, val_dataloaders
            )

        def run(context: RunContext) -> None:
            with preemption.signals_stop(context):
                self._fit(context, train_dataloaders, val_dataloaders, ckpt_path)

        self._run("fit", module, run, new_run=True, datamodule=datamodule)

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
        arguments.check_module(module)
        assert module is not None
        arguments.check_ckpt_path(ckpt_path)
        datamodule, (dataloaders,) = datamodule_of("predict", datamodule, dataloaders=dataloaders)
        limit = self.fast_dev_run or None

        def prepare() -> list[PreparedDataLoader]:
            source = eval_loaders(
                "predict", "predict", datamodule if datamodule is not None else module, dataloaders
            )
            return prepare_eval_loaders(self.accelerator, source, limit, "predict", module=module)[
                0
            ]

        # Given loaders are checked before the run; a DataModule's come after its setup.
        prepared = prepare() if datamodule is None else None
        self._load_weights(module, ckpt_path)

        def run(context: RunContext) -> list[Any]:
            loaders = prepared if prepared is not None else prepare()
            context.prepare_module(self.compile, ("predict_step",))
            return loops.predict(context, loaders)

        result: list[Any] = self._run("predict", module, run, new_run=False, datamodule=datamodule)
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

    # --- building and running a RunContext ------------------------------------------------------
    def _run(
        self,
        stage: str,
        module: TrainModule,
        body: Callable[[RunContext], Any],
        new_run: bool,
        datamodule: DataModule | None = None,
    ) -> Any:
        """Build the run's context, fire setup, run ``body``, and always tear down
        (on_exception on errors). ``new_run``: fit starts afresh; evaluation continues.
        ``datamodule``: prepared and set up before every other setup hook, torn down before
        every other teardown hook (Lightning's order)."""
        # Every LoopSettings field is the Trainer attribute of the same name.
        settings = LoopSettings(**{f.name: getattr(self, f.name) for f in fields(LoopSettings)})
        context = RunContext(
            module=module,
            accelerator=self.accelerator,
            settings=settings,
            loggers=self.loggers,
            stage=stage,
            previous=None if new_run else self._context,
            profiler=self.profiler,
        )
        self._context = context
        self._datamodule = datamodule
        object.__setattr__(module, "_trainer", self)
        self.callbacks = arguments.merge_module_callbacks(self.callbacks, module)
        if self.fast_dev_run:  # the module's own writers are left out too
            self.callbacks = run_control.without_writers(self.callbacks)
        context.hooks = collect_hooks(self.callbacks, module, self, self.profiler.timed_hooks)
        status = "success"
        try:
            start_logger_call(self.loggers, self.accelerator, stage, module, datamodule)
            if datamodule is not None:
                datamodule.trainer = self
                start_datamodule(self.accelerator, datamodule, stage)
            context.fire("setup", stage)
            return body(context)
        except BaseException as exception:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            for callback in self.callbacks:
                callback.on_exception(self, module, exception)
            module.on_exception(exception)
            raise
        finally:
            context.release()
            context.train_metrics.close()
            context.eval_metrics.close()
            context.active_metrics = context.train_metrics
            if self.is_global_zero:  # flushed, not finished: the next call writes on
                end_logger_call(self.loggers, status)
            try:
                if datamodule is not None:
                    datamodule.teardown(stage)
                context.fire("teardown", stage)
            finally:
                context.state.stage = None

    def _resolve_checkpoint(self, ckpt_path: Any) -> Path | None:
        """``ckpt_path`` as a path (rank 0's answer for "last" / "best", so every process
        loads the same checkpoint even when their folders differ)."""
        path = trainer_checkpoint.resolve(self, ckpt_path)
        if self.world_size > 1 and ckpt_path is not None:
            path = self.accelerator.broadcast(path)
        return path

    def _load_weights(self, module: TrainModule, ckpt_path: Any) -> None:
        """Load the weights of ``ckpt_path`` (a path, "last" or "best") into ``module`` for
        validate / test / predict, checked before anything changes."""
        path = self._resolve_checkpoint(ckpt_path)
        if path is None:
            return
        weights = trainer_checkpoint.read_weights_for(module, path)
        self.accelerator.strategy.load_full_state_dict(module, weights)

    def _last_module(self) -> TrainModule | None:
        return self._context.module if self._context is not None else None

    def _fit(
        self, context: RunContext, train_dataloaders: Any, val_dataloaders: Any, ckpt_path: Any
    ) -> None:
        module = context.module
        # The checkpoint is read and checked before anything changes (after setup, which
        # tells the checkpoint callback its folder).
        path = self._resolve_checkpoint(ckpt_path)
        checkpoint = trainer_checkpoint.read_for_fit(self, module, path) if path else None
        datamodule = self._datamodule
        if datamodule is not None:  # its state first: it may decide the loaders it builds
            trainer_checkpoint.restore_datamodule(datamodule, checkpoint)
            train_dataloaders, val_dataloaders = fit_loaders(datamodule, None, None)
        if self.overfit_batches:
            train_dataloaders, val_dataloaders = run_control.overfit_loaders(
                train_dataloaders, val_dataloaders, overrides(module, "validation_step")
            )
        # Nothing left of an earlier fit's optimizer in the accelerator.
        self.accelerator.free_memory()
        context.prepare_module(self.compile, ("training_step", "validation_step"))
        context.train_loader, context.num_training_batches = prepare_train_loader(
            self.accelerator,
            train_dataloaders,
            self.limit_train_batches,
            self.val_check_interval,
            self.check_val_every_n_epoch,
            validates=val_dataloaders is not None
            and overrides(module, "validation_step")
            and self.limit_val_batches != 0,
            module=module,
        )
        if val_dataloaders is not None:
            context.val_loaders, context.num_val_batches = prepare_eval_loaders(
                self.accelerator,
                val_dataloaders,
                self.limit_val_batches,
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
            trainer_checkpoint.restore(self, context, checkpoint)
        hparams = {**(datamodule.hparams if datamodule is not None else {}), **module.hparams}
        if hparams and self.is_global_zero:
            for logger in self.loggers:
                logger.log_hyperparams(hparams)
        try:
            loops.fit(context)
        except preemption.Preempted as stop:
            preemption.save_and_exit(self, context, stop.signal)

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
        arguments.check_module(module)
        assert module is not None
        arguments.check_ckpt_path(ckpt_path)
        if not overrides(module, f"{stage}_step"):
            raise MisconfigurationError(
                f"Trainer.{entry}() needs {type(module).__name__}.{stage}_step(batch, batch_idx)."
            )
        datamodule, (dataloaders,) = datamodule_of(entry, datamodule, dataloaders=dataloaders)
        limit = self.limit_val_batches if stage == "validation" else self.limit_test_batches

        def prepare() -> tuple[list[PreparedDataLoader], list[int | None]]:
            source = eval_loaders(
                entry, stage, datamodule if datamodule is not None else module, dataloaders
            )
            return prepare_eval_loaders(self.accelerator, source, limit, stage, module=module)

        # Given loaders are checked before the run; a DataModule's come after its setup.
        prepared = prepare() if datamodule is None else None
        self._load_weights(module, ckpt_path)

        def run(context: RunContext) -> list[dict[str, float]]:
            loaders, lengths = prepared if prepared is not None else prepare()
            if stage == "validation":
                context.num_val_batches = lengths
            context.prepare_module(self.compile, (f"{stage}_step",))
            return loops.evaluate(context, stage, loaders)

        result: list[dict[str, float]] = self._run(
            entry, module, run, new_run=False, datamodule=datamodule
        )
        return result
