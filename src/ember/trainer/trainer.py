"""``Trainer``: takes a ``TrainModule`` and data loaders and runs fit / validate / test / predict.

The Trainer checks its arguments, owns the ``Accelerator`` (device, precision, accumulation),
the callbacks and the loggers, and hands the loop itself to ``loops.py``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ember.accelerator.accelerator import Accelerator
from ember.accelerator.data import DataLoaderConfiguration, PreparedDataLoader
from ember.accelerator.optim import AcceleratedOptimizer
from ember.accelerator.precision import canonical_precision
from ember.accelerator.strategies import pick_device, resolve_strategy
from ember.errors import MisconfigurationError, one_of
from ember.hooks import EVENTS, Callback, ModuleHooks
from ember.loggers.base import Logger
from ember.module import TrainModule, overrides
from ember.seed import seed_everything
from ember.trainer import loops
from ember.trainer.logging import MetricStore
from ember.trainer.optimizers import SchedulerConfig, parse_optimizers
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
        self.max_epochs = _check_count("max_epochs", max_epochs, allow_none=True)
        self.max_steps = _check_count("max_steps", max_steps)
        if self.max_epochs is None:
            self.max_epochs = 1000 if self.max_steps == -1 else -1
        self.accumulate_grad_batches = _check_positive(
            "accumulate_grad_batches", accumulate_grad_batches
        )
        self.gradient_clip_val = _check_clip_value(gradient_clip_val)
        if gradient_clip_algorithm not in _CLIP_ALGORITHMS:
            raise MisconfigurationError(
                one_of("gradient_clip_algorithm", gradient_clip_algorithm, _CLIP_ALGORITHMS)
            )
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.val_check_interval = _check_val_check_interval(val_check_interval)
        self.check_val_every_n_epoch = _check_positive(
            "check_val_every_n_epoch", check_val_every_n_epoch, allow_none=True
        )
        if self.check_val_every_n_epoch is None and not isinstance(self.val_check_interval, int):
            raise MisconfigurationError(
                "`check_val_every_n_epoch=None` counts batches over epochs and needs an integer "
                f"`val_check_interval` (got {val_check_interval!r})."
            )
        self.limit_train_batches = _check_limit("limit_train_batches", limit_train_batches)
        self.limit_val_batches = _check_limit("limit_val_batches", limit_val_batches)
        self.limit_test_batches = _check_limit("limit_test_batches", limit_test_batches)
        if not isinstance(num_sanity_val_steps, int) or num_sanity_val_steps < -1:
            raise MisconfigurationError(
                f"`num_sanity_val_steps={num_sanity_val_steps!r}` is not supported: use an "
                "integer >= 0, or -1 for every validation batch."
            )
        self.num_sanity_val_steps = num_sanity_val_steps
        self.log_every_n_steps = _check_positive("log_every_n_steps", log_every_n_steps)
        if on_nonfinite_loss not in _NONFINITE_MODES:
            raise MisconfigurationError(
                one_of("on_nonfinite_loss", on_nonfinite_loss, _NONFINITE_MODES)
            )
        self.on_nonfinite_loss = on_nonfinite_loss
        if not isinstance(compile, (bool, dict)):
            raise MisconfigurationError(
                f"`compile={compile!r}` is not supported: use True, False, or a dict of "
                "torch.compile arguments such as {'mode': 'max-autotune'}."
            )
        self.compile = compile
        self.default_root_dir = (
            Path(default_root_dir) if default_root_dir is not None else Path.cwd()
        )
        self.enable_checkpointing = bool(enable_checkpointing)

        if seed is not None:
            seed_everything(seed)
        _set_deterministic(deterministic)
        precision_name = canonical_precision(precision)
        device = _resolve_device(accelerator, devices, num_nodes)
        self.accelerator = Accelerator(
            mixed_precision=precision_name,
            gradient_accumulation_steps=self.accumulate_grad_batches,
            dataloader_config=dataloader_config,
            strategy=resolve_strategy(strategy, device),
            project_dir=self.default_root_dir,
        )
        self.callbacks = _resolve_callbacks(callbacks, enable_progress_bar)
        self.loggers = _resolve_loggers(logger, self.default_root_dir)

        self.state = LoopState()
        self.should_stop = False
        self._latest: dict[str, Any] = {}
        self._logged: dict[str, float] = {}
        self._train_metrics = MetricStore()
        self._eval_metrics = MetricStore()
        # Both stores write the latest values into one dict: `callback_metrics`.
        self._eval_metrics._latest = self._train_metrics._latest
        self._eval_metrics._prog_bar = self._train_metrics._prog_bar
        self._metrics = self._train_metrics
        self._progress_only = self._train_metrics._progress_only
        self._module: TrainModule | None = None
        self._model: torch.nn.Module | None = None
        self._hooks: dict[str, tuple[Callable[..., Any], ...]] = {event: () for event in EVENTS}
        self._optimizer: AcceleratedOptimizer | None = None
        self._schedulers: list[SchedulerConfig] = []
        self._train_loader: PreparedDataLoader | None = None
        self._val_loaders: list[PreparedDataLoader] = []
        self._window_losses: list[tuple[int, Tensor]] = []
        self._clip_gradients: Callable[[], Any] = _do_nothing
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
        """The latest values logged with ``prog_bar=True`` (and the training loss)."""
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
        _check_module(module)
        _check_ckpt_path(ckpt_path)
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
        _check_module(module)
        assert module is not None
        _check_ckpt_path(ckpt_path)
        dataloaders = dataloaders if dataloaders is not None else module.predict_dataloader()
        loaders = self._prepare_eval_loaders(dataloaders, None, "predict")

        def run() -> list[Any]:
            self._setup_module(module)
            return loops.predict(self, loaders)

        result: list[Any] = self._run("predict", module, run)
        return result

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint (not available in this version of ember yet)."""
        raise MisconfigurationError(
            "Trainer.save_checkpoint is not available in this version of ember yet. To keep "
            "the weights, use `trainer.accelerator.save_model(module, directory)`."
        )

    # --- internals used by the loops ------------------------------------------------------------
    def _run(self, stage: str, module: TrainModule, body: Callable[[], Any]) -> Any:
        """Attach, fire setup, run ``body``, and always tear down (on_exception on errors)."""
        object.__setattr__(module, "_trainer", self)
        self._module = module
        self.state.stage = stage
        self._hooks = _collect_hooks(self.callbacks, module, self)
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
        self.should_stop = False
        self._setup_module(module)
        optimizer, schedulers = parse_optimizers(module.configure_optimizers())
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
        _check_module(module)
        assert module is not None
        _check_ckpt_path(ckpt_path)
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
        length = _length(loader)
        if length == 0:
            raise MisconfigurationError(
                "The training loader is empty (0 batches). Check the dataset's length and "
                "the batch size (with drop_last=True a dataset smaller than one batch is empty)."
            )
        limit = _apply_limit("limit_train_batches", self.limit_train_batches, length)
        if limit == 0:
            raise MisconfigurationError(
                f"`limit_train_batches={self.limit_train_batches!r}` leaves 0 of the loader's "
                f"{length} batches to train on; raise it."
            )
        prepared = self.accelerator.prepare_data_loader(loader, max_batches=limit)
        self.num_training_batches = prepared.known_length()
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
        loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        prepared = []
        lengths: list[int | None] = []
        for loader in loaders:
            length = _length(loader)
            max_batches = _apply_limit(
                f"limit_{'val' if stage == 'validation' else stage}_batches", limit, length
            )
            item = self.accelerator.prepare_data_loader(loader, max_batches=max_batches)
            prepared.append(item)
            lengths.append(item.known_length())
        if stage == "validation":
            self.num_val_batches = lengths
        return prepared

    def _make_clipper(self, module: TrainModule) -> Callable[[], Any]:
        # No clipping is a function that does nothing, not an `if` in the loop.
        if self.gradient_clip_val is None:
            return _do_nothing
        parameters = [p for p in module.parameters() if p.requires_grad]
        if self.gradient_clip_algorithm == "norm":
            return partial(self.accelerator.clip_grad_norm_, parameters, self.gradient_clip_val)
        return partial(self.accelerator.clip_grad_value_, parameters, self.gradient_clip_val)

    def _validation_enabled(self) -> bool:
        return (
            bool(self._val_loaders)
            and overrides(self.module, "validation_step")
            and self.limit_val_batches != 0
        )

    def _validation_due(self, batch_idx: int) -> bool:
        if not self._val_loaders or not self._validation_enabled():
            return False
        interval = self.val_check_interval
        if self.check_val_every_n_epoch is None:
            return self.state.total_batch_idx % int(interval) == 0
        if (self.state.epoch + 1) % self.check_val_every_n_epoch != 0:
            return False
        done = batch_idx + 1
        total = self.num_training_batches
        if isinstance(interval, float):
            if total is None:
                return self.accelerator.gradient_state.end_of_dataloader
            every = max(1, int(total * interval))
            return done % every == 0 or (interval == 1.0 and done == total)
        return done % interval == 0

    def _sanity_limit(self) -> int | None:
        return None if self.num_sanity_val_steps == -1 else self.num_sanity_val_steps

    def _should_stop_now(self) -> bool:
        if self.should_stop:
            return True
        return self.max_steps != -1 and self.state.global_step >= self.max_steps

    def _fit_done(self) -> bool:
        if self._should_stop_now():
            return True
        return self.max_epochs != -1 and self.state.epoch >= (self.max_epochs or 0)

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


# --- argument checks ------------------------------------------------------------------------------


def _do_nothing() -> None:
    return None


def _check_count(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: use an integer >= 0, or -1 for no limit."
        )
    return value


def _check_positive(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: it must be an integer >= 1."
        )
    return value


def _check_clip_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise MisconfigurationError(
            f"`gradient_clip_val={value!r}` is not supported: use a number >= 0, or None for no "
            "clipping."
        )
    return float(value)


def _check_val_check_interval(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MisconfigurationError(
            f"`val_check_interval={value!r}` is not supported: use a float in (0, 1] (a fraction "
            "of the epoch) or an int >= 1 (a number of training batches)."
        )
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise MisconfigurationError(
            f"`val_check_interval={value!r}` is not supported: a float must be in (0, 1]; for a "
            "number of batches pass an int."
        )
    if isinstance(value, int) and value < 1:
        raise MisconfigurationError(
            f"`val_check_interval={value!r}` is not supported: an int must be >= 1."
        )
    return value


def _check_limit(name: str, value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: use None (every batch), an int >= 0 (that many "
            "batches) or a float in [0, 1] (that fraction)."
        )
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise MisconfigurationError(
            f"`{name}={value!r}` is not supported: a float must be in [0, 1]."
        )
    if isinstance(value, int) and value < 0:
        raise MisconfigurationError(f"`{name}={value!r}` is not supported: an int must be >= 0.")
    return value


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _apply_limit(name: str, limit: int | float | None, length: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, int):
        return limit
    if length is None:
        if limit == 1.0:
            return None
        raise MisconfigurationError(
            f"`{name}={limit}` is a fraction, but the loader has no length; give an int."
        )
    return int(length * limit)


def _check_module(module: Any) -> None:
    if not isinstance(module, TrainModule):
        raise MisconfigurationError(
            f"Expected a TrainModule (a subclass of ember.TrainModule), got "
            f"{type(module).__name__}. Subclass TrainModule and define training_step and "
            "configure_optimizers."
        )


def _check_ckpt_path(ckpt_path: Any) -> None:
    if ckpt_path is not None:
        raise MisconfigurationError(
            f"`ckpt_path={ckpt_path!r}`: resuming from checkpoints is not available in this "
            "version of ember yet; pass ckpt_path=None."
        )


def _set_deterministic(deterministic: bool | str) -> None:
    if deterministic not in (True, False, "warn"):
        raise MisconfigurationError(
            one_of("deterministic", deterministic, ["True", "False", "warn"])
        )
    if deterministic is False:
        return
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _resolve_device(accelerator: str, devices: Any, num_nodes: Any) -> torch.device:
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise MisconfigurationError(
            f"`num_nodes={num_nodes!r}` is not supported: it must be an integer >= 1."
        )
    if num_nodes > 1:
        raise MisconfigurationError(
            f"`num_nodes={num_nodes}`: multi-machine training is not available in this version of "
            "ember yet; use num_nodes=1."
        )
    index = 0
    if devices == "auto":
        count = 1
    elif isinstance(devices, int) and not isinstance(devices, bool):
        count = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, (list, tuple)) and all(isinstance(d, int) for d in devices):
        count = len(devices)
        index = devices[0] if devices else 0
    else:
        raise MisconfigurationError(
            f"`devices={devices!r}` is not supported: use 'auto', a positive integer, or a "
            "list of device indices such as [0]."
        )
    if count < 1:
        raise MisconfigurationError(
            f"`devices={devices!r}` selects no device: use 'auto' or an integer >= 1."
        )
    if count > 1:
        raise MisconfigurationError(
            f"`devices={devices!r}`: training on several devices (DDP/FSDP) is not available in "
            "this version of ember yet; use devices=1."
        )
    return pick_device(accelerator, index)


def _resolve_callbacks(callbacks: Any, enable_progress_bar: bool) -> list[Callback]:
    from ember.callbacks.progress import ProgressBar

    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, Callback):
        callbacks = [callbacks]
    elif isinstance(callbacks, Iterable) and not isinstance(callbacks, (str, bytes)):
        callbacks = list(callbacks)
    else:
        raise MisconfigurationError(
            f"`callbacks` must be a Callback or a list of them, got {type(callbacks).__name__}."
        )
    wrong = [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]
    if wrong:
        raise MisconfigurationError(
            f"`callbacks` must hold ember.Callback instances; got {', '.join(wrong)}."
        )
    has_bar = any(isinstance(cb, ProgressBar) for cb in callbacks)
    if has_bar and not enable_progress_bar:
        raise MisconfigurationError(
            "`enable_progress_bar=False` but a ProgressBar was passed in `callbacks`; remove one."
        )
    if enable_progress_bar and not has_bar:
        callbacks.append(ProgressBar())
    return callbacks


def _resolve_loggers(logger: Any, root: Path) -> list[Logger]:
    if logger is True:
        if importlib.util.find_spec("tensorboard") is not None:
            from ember.loggers.tensorboard import TensorBoardLogger

            return [TensorBoardLogger(root, name="ember_logs")]
        from ember.loggers.csv import CSVLogger

        return [CSVLogger(root, name="ember_logs")]
    if logger is False or logger is None:
        return []
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
    wrong = [type(item).__name__ for item in loggers if not isinstance(item, Logger)]
    if wrong:
        raise MisconfigurationError(
            f"`logger` must be True, False, an ember Logger or a list of them; got {', '.join(wrong)}."
        )
    return loggers


def _collect_hooks(
    callbacks: list[Callback], module: TrainModule, trainer: Trainer
) -> dict[str, tuple[Callable[..., Any], ...]]:
    """For each event, the overridden methods to call: callbacks first, then the module.

    Methods left at their no-op default are not called at all, so an unused event costs
    one empty loop.
    """
    hooks: dict[str, tuple[Callable[..., Any], ...]] = {}
    for event in EVENTS:
        found: list[Callable[..., Any]] = [
            partial(getattr(callback, event), trainer, module)
            for callback in callbacks
            if getattr(type(callback), event) is not getattr(Callback, event)
        ]
        if getattr(type(module), event, None) is not getattr(ModuleHooks, event):
            found.append(getattr(module, event))
        hooks[event] = tuple(found)
    return hooks
