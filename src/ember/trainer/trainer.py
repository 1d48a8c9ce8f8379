"""``Trainer``: takes a ``TrainModule`` and data loaders and runs fit / validate / test / predict.

The Trainer checks its arguments, owns the ``Accelerator`` (device, precision, accumulation),
the callbacks and the loggers, and hands the loop itself to ``loops.py``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ember.accelerator.accelerator import Accelerator
from ember.accelerator.data import DataLoaderConfiguration, PreparedDataLoader
from ember.accelerator.optim import AcceleratedOptimizer
from ember.accelerator.precision import canonical_precision
from ember.accelerator.strategies import resolve_strategy
from ember.errors import MisconfigurationError, not_available_yet
from ember.hooks import EVENTS, Callback, collect_hooks
from ember.loggers.base import Logger
from ember.module import TrainModule, overrides
from ember.seed import seed_everything
from ember.trainer import arguments, loops
from ember.trainer.logging import MetricStore
from ember.trainer.optimizers import SchedulerConfig, check_automatic, parse_optimizers
from ember.trainer.state import LoopState

_NONFINITE_MODES = ("raise", "skip")
_CLIP_ALGORITHMS = ("norm", "value")


class Trainer:
    """Runs the training loop of a ``TrainModule``.

    Args:
        max_epochs: stop after this many epochs (-1: no limit). With neither this nor
            ``max_steps``, training runs 1000 epochs.
        max_steps: stop after this many optimizer steps (-1: no limit).
        accelerator: "auto", "cpu", "cuda" or "mps".
        devices: "auto", a count, or a list of device indices (one device for now).
        strategy: "auto" ("ddp" and "fsdp" are not available in this version yet).
        num_nodes: machines taking part (1 for now).
        precision: "32-true", "16-mixed", "bf16-mixed" or "bf16-true".
        accumulate_grad_batches: batches per optimizer step.
        gradient_clip_val: clip the gradient (None: no clipping).
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
        enable_checkpointing: save checkpoints with ``ModelCheckpoint`` (not available yet).
        enable_progress_bar: add a ``ProgressBar`` unless one is given.
        default_root_dir: where logs and checkpoints go (default: the working directory).
        seed: call ``seed_everything(seed)`` now.
        deterministic: use deterministic algorithms (True, False or "warn").
        dataloader_config: how loaders are prepared (``DataLoaderConfiguration``).
        compile: ``torch.compile`` the module (True, or a dict of ``torch.compile`` arguments).
        on_nonfinite_loss: "raise" (stop, naming the step and batch) or "skip" (drop the
            update, counted in the logged metric ``skipped_steps``).
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
        precision: str | int = "32-true",
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
    ) -> None:
        self.max_epochs = arguments.check_count("max_epochs", max_epochs, allow_none=True)
        self.max_steps = arguments.check_count("max_steps", max_steps)
        if self.max_epochs is None:
            self.max_epochs = 1000 if self.max_steps == -1 else -1
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

        if seed is not None:
            seed_everything(seed)
        arguments.set_deterministic(deterministic)
        precision_name = canonical_precision(precision)
        device = arguments.resolve_device(accelerator, devices, num_nodes)
        self.accelerator = Accelerator(
            mixed_precision=precision_name,
            gradient_accumulation_steps=self.accumulate_grad_batches,
            dataloader_config=dataloader_config,
            strategy=resolve_strategy(strategy, device),
            project_dir=self.default_root_dir,
        )
        self.callbacks = arguments.resolve_callbacks(callbacks, enable_progress_bar)
        self.loggers = arguments.resolve_loggers(logger, self.default_root_dir)

        self.state = LoopState()
        self.should_stop = False
        self._logged: dict[str, float] = {}
        self._train_metrics = MetricStore()
        self._eval_metrics = MetricStore()
        # Both stores write the latest values into one dict: `callback_metrics`.
        self._eval_metrics._latest = self._train_metrics._latest
        self._eval_metrics._prog_bar = self._train_metrics._prog_bar
        self._metrics = self._train_metrics
        self._module: TrainModule | None = None
        self._model: torch.nn.Module | None = None
        self._hooks: dict[str, tuple[Callable[..., Any], ...]] = {event: () for event in EVENTS}
        self._optimizer: AcceleratedOptimizer | None = None
        self._schedulers: list[SchedulerConfig] = []
        self._train_loader: PreparedDataLoader | None = None
        self._val_loaders: list[PreparedDataLoader] = []
        self._window_losses: list[tuple[int, Tensor]] = []
        self._clip_gradients: Callable[[], Any] | None = None
        self._autocast = self.accelerator.precision.autocast
        #: What the last validation / test run logged (also in ``callback_metrics``).
        self.last_eval_metrics: dict[str, float] = {}
        self.num_training_batches: int | None = None
        self.num_val_batches: list[int | None] = []

    # --- read-only state ---------------------------------------------------------------------
    @property
    def module(self) -> TrainModule:
        """The module being run."""
        if self._module is None:
            raise MisconfigurationError(
                "The Trainer has no module yet: call fit/validate/test first."
            )
        return self._module

    @property
    def global_step(self) -> int:
        """Optimizer steps taken."""
        return self.state.global_step

    @property
    def current_epoch(self) -> int:
        """The epoch being run (the number of finished epochs)."""
        return self.state.epoch

    @property
    def callback_metrics(self) -> dict[str, float]:
        """The latest value of every logged name (and "loss")."""
        return self._train_metrics.latest()

    @property
    def logged_metrics(self) -> dict[str, float]:
        """The latest values sent to the loggers."""
        return self._logged

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """The latest values logged with ``prog_bar=True``."""
        return self._train_metrics.progress_bar_metrics()

    @property
    def sanity_checking(self) -> bool:
        """Whether the validation sanity check before training is running."""
        return self.state.sanity_checking

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
        return [self._optimizer] if self._optimizer is not None else []

    @property
    def lr_scheduler_configs(self) -> list[SchedulerConfig]:
        return list(self._schedulers)

    # --- entry points ------------------------------------------------------------------------
    def fit(
        self,
        module: TrainModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Train ``module`` on ``train_dataloaders``, validating on ``val_dataloaders``."""
        arguments.check_module(module)
        arguments.check_ckpt_path(ckpt_path)
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
        train_dataloaders = (
            train_dataloaders if train_dataloaders is not None else module.train_dataloader()
        )
        if train_dataloaders is None:
            raise MisconfigurationError(
                "fit() got no training data: pass train_dataloaders or define "
                f"{type(module).__name__}.train_dataloader()."
            )
        if val_dataloaders is None:
            val_dataloaders = module.val_dataloader()
        self._run("fit", module, lambda: self._fit(module, train_dataloaders, val_dataloaders))

    def validate(
        self,
        module: TrainModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> list[dict[str, float]]:
        """Run ``validation_step`` over ``dataloaders``; one dict of metrics per loader."""
        return self._evaluate("validate", "validation", module, dataloaders, ckpt_path)

    def test(
        self,
        module: TrainModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> list[dict[str, float]]:
        """Run ``test_step`` over ``dataloaders``; one dict of metrics per loader."""
        return self._evaluate("test", "test", module, dataloaders, ckpt_path)

    def predict(
        self,
        module: TrainModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> list[Any]:
        """Run ``predict_step`` over ``dataloaders`` and return its outputs in order."""
        module = module if module is not None else self._module
        arguments.check_module(module)
        assert module is not None
        arguments.check_ckpt_path(ckpt_path)
        dataloaders = dataloaders if dataloaders is not None else module.predict_dataloader()
        if dataloaders is None:
            raise MisconfigurationError(
                "Trainer.predict() got no data: pass dataloaders or define "
                f"{type(module).__name__}.predict_dataloader()."
            )
        loaders = self._prepare_eval_loaders(dataloaders, None, "predict")

        def run() -> list[Any]:
            self._setup_module(module)
            return loops.predict(self, loaders)

        result: list[Any] = self._run("predict", module, run)
        return result

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint (not available in this version of ember yet)."""
        raise not_available_yet(
            "Trainer.save_checkpoint",
            "To keep the weights, use `trainer.accelerator.save_model(module, directory)`.",
        )

    # --- internals used by the loops ------------------------------------------------------------
    def _run(self, stage: str, module: TrainModule, body: Callable[[], Any]) -> Any:
        """Attach, fire setup, run ``body``, and always tear down (on_exception on errors)."""
        object.__setattr__(module, "_trainer", self)
        self._module = module
        self.state.stage = stage
        self._hooks = collect_hooks(self.callbacks, module, self)
        status = "success"
        try:
            self._fire("setup", stage)
            return body()
        except BaseException as exception:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            for callback in self.callbacks:
                callback.on_exception(self, module, exception)
            module.on_exception(exception)
            raise
        finally:
            self._train_metrics.close()
            self._eval_metrics.close()
            self._metrics = self._train_metrics
            if self.is_global_zero:
                for logger in self.loggers:
                    logger.finalize(status)
            try:
                self._fire("teardown", stage)
            finally:
                self.state.stage = None

    def _fire(self, event: str, *args: Any) -> None:
        for hook in self._hooks[event]:
            hook(*args)

    def _setup_module(self, module: TrainModule) -> None:
        self._model = self.accelerator.prepare_model(module)
        if self.compile is not False and getattr(module, "_compiled_call_impl", None) is None:
            module.compile(**(self.compile if isinstance(self.compile, dict) else {}))

    def _fit(self, module: TrainModule, train_dataloaders: Any, val_dataloaders: Any) -> None:
        # Each fit is a new run: fresh loop progress and nothing left of an earlier fit's
        # optimizer in the accelerator (resuming will come from ckpt_path).
        self.state = LoopState(stage="fit")
        self.should_stop = False
        self.accelerator.free_memory()
        self._setup_module(module)
        optimizers, schedulers = parse_optimizers(module.configure_optimizers())
        check_automatic(optimizers, type(module).__name__)
        optimizer = optimizers[0]
        self._optimizer = self.accelerator.prepare_optimizer(optimizer)
        for config in schedulers:
            config.scheduler = self.accelerator.prepare_scheduler(config.scheduler)
        self._schedulers = schedulers
        self._clip_gradients = self._make_clipper(module)
        self._train_loader = self._prepare_train_loader(train_dataloaders)
        self._val_loaders = (
            self._prepare_eval_loaders(val_dataloaders, self.limit_val_batches, "validation")
            if val_dataloaders is not None
            else []
        )
        if self._val_loaders and not overrides(module, "validation_step"):
            warnings.warn(
                f"fit() got validation loaders but {type(module).__name__} has no "
                "validation_step: validation is skipped. Define validation_step(batch, batch_idx) "
                "to validate.",
                UserWarning,
                stacklevel=3,
            )
        self._window_losses = []
        if module.hparams and self.is_global_zero:
            for logger in self.loggers:
                logger.log_hyperparams(dict(module.hparams))
        loops.fit(self)

    def _evaluate(
        self,
        entry: str,
        stage: str,
        module: TrainModule | None,
        dataloaders: Any,
        ckpt_path: str | os.PathLike[str] | None,
    ) -> list[dict[str, float]]:
        module = module if module is not None else self._module
        arguments.check_module(module)
        assert module is not None
        arguments.check_ckpt_path(ckpt_path)
        if not overrides(module, f"{stage}_step"):
            raise MisconfigurationError(
                f"Trainer.{entry}() needs {type(module).__name__}.{stage}_step(batch, batch_idx)."
            )
        if dataloaders is None:
            dataloaders = getattr(
                module, "val_dataloader" if stage == "validation" else "test_dataloader"
            )()
        if dataloaders is None:
            raise MisconfigurationError(
                f"Trainer.{entry}() got no data: pass dataloaders or define "
                f"{type(module).__name__}.{'val' if stage == 'validation' else 'test'}_dataloader()."
            )
        limit = self.limit_val_batches if stage == "validation" else self.limit_test_batches
        loaders = self._prepare_eval_loaders(dataloaders, limit, stage)

        def run() -> list[dict[str, float]]:
            self._setup_module(module)
            return loops.evaluate(self, stage, loaders)

        result: list[dict[str, float]] = self._run(entry, module, run)
        return result

    def _prepare_train_loader(self, loader: Any) -> PreparedDataLoader:
        arguments.check_loader("fit()", loader)
        if isinstance(loader, (list, tuple)) and any(
            isinstance(item, (DataLoader, PreparedDataLoader)) for item in loader
        ):
            raise MisconfigurationError(
                f"fit() got {len(loader)} training loaders; it trains on one. Combine their "
                "datasets (torch.utils.data.ConcatDataset) into one loader."
            )
        length = arguments.length(loader)
        if length == 0:
            raise MisconfigurationError(
                "The training loader is empty (0 batches). Check the dataset's length and "
                "the batch size (with drop_last=True a dataset smaller than one batch is empty)."
            )
        limit = arguments.apply_limit("limit_train_batches", self.limit_train_batches, length)
        if limit == 0:
            raise MisconfigurationError(
                f"`limit_train_batches={self.limit_train_batches!r}` leaves 0 of the loader's "
                f"{length} batches to train on; raise it."
            )
        prepared = self.accelerator.prepare_data_loader(loader, max_batches=limit)
        # Only a certain length decides windows and validation timing (an IterableDataset's
        # __len__ is an estimate).
        self.num_training_batches = prepared.exact_length()
        interval = self.val_check_interval
        if isinstance(interval, int) and self.num_training_batches is not None:
            if interval > self.num_training_batches and self.check_val_every_n_epoch is not None:
                raise MisconfigurationError(
                    f"`val_check_interval={interval}` is more than the {self.num_training_batches} "
                    "training batches of an epoch. Use a smaller interval, or set "
                    "check_val_every_n_epoch=None to count batches over epochs."
                )
        elif isinstance(interval, float) and interval != 1.0 and self.num_training_batches is None:
            raise MisconfigurationError(
                f"`val_check_interval={interval}` is a fraction of an epoch, but the training "
                "loader has no length. Give an integer number of batches instead."
            )
        return prepared

    def _prepare_eval_loaders(
        self, dataloaders: Any, limit: int | float | None, stage: str
    ) -> list[PreparedDataLoader]:
        arguments.check_loader(f"{stage} (dataloaders)", dataloaders)
        loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        for loader in loaders:
            arguments.check_loader(f"{stage} (dataloaders)", loader)
        prepared = []
        lengths: list[int | None] = []
        for loader in loaders:
            length = arguments.length(loader)
            max_batches = arguments.apply_limit(
                f"limit_{'val' if stage == 'validation' else stage}_batches", limit, length
            )
            item = self.accelerator.prepare_data_loader(loader, max_batches=max_batches)
            prepared.append(item)
            lengths.append(item.known_length())
        if stage == "validation":
            self.num_val_batches = lengths
        return prepared

    def _make_clipper(self, module: TrainModule) -> Callable[[], Any] | None:
        if self.gradient_clip_val is None:
            return None
        parameters = [p for p in module.parameters() if p.requires_grad]
        if self.gradient_clip_algorithm == "norm":
            return partial(self.accelerator.clip_grad_norm_, parameters, self.gradient_clip_val)
        return partial(self.accelerator.clip_grad_value_, parameters, self.gradient_clip_val)

    def _step_scheduler(self, config: SchedulerConfig, wrapped: bool) -> None:
        # Epoch schedulers step whatever the last optimizer step did; step schedulers only
        # after a real optimizer step (the wrapper checks).
        scheduler = config.scheduler if wrapped else config.scheduler.scheduler
        if config.needs_metric:
            metrics = self.callback_metrics
            if config.monitor not in metrics:
                raise MisconfigurationError(
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged. "
                    f"Logged names: {sorted(metrics)}."
                )
            scheduler.step(metrics[config.monitor])
        else:
            scheduler.step()

    def _reduce_across_processes(self, tensor: Tensor, reduction: str) -> Tensor:
        result: Tensor = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction)
        return result

    def _send_to_loggers(self, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        self._logged.update(metrics)
        if self.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, self.state.global_step)
