"""``RunContext``: everything one fit / validate / test / predict run holds.

The Trainer builds a context at the start of each entry point and hands it to the loops; the
loops read and write the context, never the Trainer, so data flows one way. The Trainer's
public properties (``global_step``, ``callback_metrics``, ``should_stop``, ``optimizers``,
...) read from the context of the current or last run.

A ``fit`` starts a new run: fresh loop progress, empty metrics, new optimizers. ``validate``,
``test`` and ``predict`` continue the run before them: they share its progress and
optimizers (so ``global_step`` still describes the fit), but start with empty metrics
(``callback_metrics`` and ``logged_metrics`` show what that call logged, as in Lightning).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ember.accelerator import distributed
from ember.errors import MisconfigurationError
from ember.hooks import EVENTS, monitors_of
from ember.module import overrides
from ember.trainer.arguments import check_choice, check_clip_value
from ember.trainer.epoch_sync import EpochSync
from ember.trainer.logging import MetricStore
from ember.trainer.optimizers import check_automatic, parse_optimizers
from ember.trainer.profiling import BACKWARD, CALLBACKS, COLLECTIVES, Profiler
from ember.trainer.state import LoopState

if TYPE_CHECKING:
    from ember.accelerator.accelerator import Accelerator
    from ember.accelerator.data import PreparedDataLoader
    from ember.accelerator.optim import AcceleratedOptimizer
    from ember.loggers.base import Logger
    from ember.module import TrainModule
    from ember.trainer.optimizers import SchedulerConfig

Hooks = dict[str, tuple[Callable[..., Any], ...]]


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """The Trainer arguments the loops read; fixed for the length of a run."""

    max_epochs: int
    max_steps: int
    val_check_interval: int | float
    check_val_every_n_epoch: int | None
    limit_val_batches: int | float | None
    num_sanity_val_steps: int
    log_every_n_steps: int
    on_nonfinite_loss: str
    #: None: no clipping (``gradient_clip_val`` None or 0).
    gradient_clip_val: float | None
    gradient_clip_algorithm: str
    #: A stop asked through ``should_stop`` waits until both are reached (None: no minimum).
    min_epochs: int | None
    min_steps: int | None
    #: Stop at the first step boundary after this long (None: no limit).
    max_time: timedelta | None


STEP_NAMES = ("training_step", "validation_step", "test_step", "predict_step")


@dataclass(frozen=True, slots=True)
class StepFunctions:
    """The module's step methods as the loops call them: ``torch.compile``d ones under
    ``Trainer(compile=...)``, else the bound methods themselves."""

    training_step: Callable[..., Any]
    validation_step: Callable[..., Any]
    test_step: Callable[..., Any]
    predict_step: Callable[..., Any]

    @classmethod
    def of(
        cls,
        module: TrainModule,
        compile: bool | dict[str, Any],
        used: tuple[str, ...] = (),
        callers: dict[str, Callable[..., Any]] | None = None,
    ) -> StepFunctions:
        """The steps of ``module``; those named in ``used`` compiled with ``compile``'s
        arguments when it is set.

        Compiling the steps (rather than ``forward``) compiles what the loop runs, including a
        ``training_step`` that never calls ``self(...)``. A step that cannot be compiled runs
        uncompiled, with a warning naming it.
        """
        steps = {name: getattr(module, name) for name in STEP_NAMES}
        steps.update(callers or {})
        if compile is False:
            return cls(**_batch_idx_dropped(module, steps))
        options = compile if isinstance(compile, dict) else {}
        for name in used:
            # A step left at its default is never called (predict_step's default is self(batch)).
            if name != "predict_step" and not overrides(module, name):
                continue
            try:
                steps[name] = torch.compile(steps[name], **options)
            except Exception as error:  # e.g. a Python version torch.compile does not support
                warnings.warn(
                    f"Trainer(compile=...) could not compile {type(module).__name__}.{name}: "
                    f"{type(error).__name__}: {error}. It runs uncompiled.",
                    UserWarning,
                    stacklevel=2,
                )
        return cls(**_batch_idx_dropped(module, steps))


def _batch_idx_dropped(
    module: TrainModule, steps: dict[str, Callable[..., Any]]
) -> dict[str, Callable[..., Any]]:
    """``steps``, where the module's method takes the batch alone (``training_step(self,
    batch)``) called without ``batch_idx``: decided once per run, from the signature, so
    the loops always pass it and a step that takes it pays nothing."""
    for name, step in steps.items():
        if not takes_batch_idx(getattr(module, name)):
            steps[name] = partial(_batch_only, step)
    return steps


def _batch_only(step: Callable[..., Any], batch: Any, *_indices: Any) -> Any:
    return step(batch)


def takes_batch_idx(step: Any) -> bool:
    """Whether a ``*_step`` method accepts a second argument, ``batch_idx``."""
    try:
        parameters = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (
        any(parameter.kind is inspect.Parameter.VAR_POSITIONAL for parameter in parameters)
        or sum(parameter.kind in positional for parameter in parameters) >= 2
    )


class RunContext:
    """One run of the Trainer: the module, the prepared objects, the progress and the metrics.

    Attributes:
        module: the ``TrainModule`` being run.
        model: the module as the accelerator prepared it (the module itself until prepared).
        accelerator: the Trainer's ``Accelerator``.
        settings: the loop settings (``LoopSettings``).
        hooks: for each event, the callback and module methods to call (``collect_hooks``).
        loggers: the Trainer's loggers (written on global rank zero only).
        is_global_zero: whether this process writes to the loggers.
        steps: the step functions the loops call (``StepFunctions``).
        state: loop progress (``LoopState``), saved whole in checkpoints.
        train_metrics / eval_metrics: what ``self.log`` recorded in training / evaluation;
            both write their latest values into one dict, ``callback_metrics``.
        active_metrics: the store ``TrainModule.log`` writes into right now.
        logged_metrics: the latest values sent to the loggers.
        last_eval_metrics: what the last validation / test run logged.
        profiler: times the parts of the training steps (``Trainer(profiler=...)``); a
            do-nothing ``Profiler`` by default.
        optimizers: the prepared optimizers (one under automatic optimization).
        scheduler_configs: the prepared schedulers and when the loop steps them.
        train_loader / val_loaders: the prepared loaders of fit.
        num_training_batches: training batches per epoch, when the loader's length is exact.
        num_val_batches / num_test_batches: batches of each validation / test loader (None:
            unknown).
        window_losses: (batch_idx, loss) of the open accumulation window.
        should_stop: set (by callbacks, through ``Trainer.should_stop``) to end fit after the
            current step.
        preempted: the signal (SIGTERM, SIGINT) that asked this process to stop, else 0.
        epoch_finished: True while the epoch-end hooks of an epoch that ran to its end fire
            (a checkpoint written then resumes with the next epoch).
        resume_rng / resume_seed / resume_metrics / pending_epoch_end: what a checkpoint
            left for the loop to put back when training starts (``trainer/checkpoint.py``).
    """

    __slots__ = (
        "accelerator",
        "active_metrics",
        "deadline",
        "epoch_finished",
        "eval_metrics",
        "handles",
        "hooks",
        "in_batch_end",
        "is_global_zero",
        "last_eval_metrics",
        "logged_metrics",
        "loggers",
        "model",
        "module",
        "num_test_batches",
        "num_training_batches",
        "num_val_batches",
        "optimizers",
        "pending_epoch_end",
        "preempted",
        "profiler",
        "resume_batch_end",
        "resume_latest",
        "resume_metrics",
        "resume_rng",
        "resume_seed",
        "scheduler_configs",
        "settings",
        "should_stop",
        "state",
        "steps",
        "stop_vote",
        "train_loader",
        "train_metrics",
        "training_rng",
        "val_loaders",
        "validation_incomplete",
        "window_losses",
    )

    def __init__(
        self,
        *,
        module: TrainModule,
        accelerator: Accelerator,
        settings: LoopSettings,
        loggers: list[Logger],
        stage: str,
        previous: RunContext | None = None,
        profiler: Profiler | None = None,
    ) -> None:
        self.module = module
        self.model: nn.Module = module
        self.accelerator = accelerator
        self.settings = settings
        self.loggers = loggers
        self.is_global_zero = accelerator.is_main_process
        self.profiler = profiler if profiler is not None else Profiler()
        self.hooks: Hooks = {event: () for event in EVENTS}
        self.hooks[monitors_of("on_train_epoch_end")] = ()
        self.steps = StepFunctions.of(module, False)
        self.train_loader: PreparedDataLoader | None = None
        self.val_loaders: list[PreparedDataLoader] = []
        self.window_losses: list[tuple[int, Tensor]] = []
        self.should_stop = False
        #: ``time.monotonic()`` past which ``should_stop`` is set (``max_time``; inf: none).
        self.deadline = math.inf
        self.preempted = 0
        self.epoch_finished = False
        self.resume_rng: dict[str, Any] | None = None
        self.resume_seed: int | None = None
        self.resume_metrics: dict[str, Any] | None = None
        self.pending_epoch_end = False
        #: True while on_train_batch_end fires: a checkpoint written then leaves the
        #: validation due after that batch to the resumed run (``resume_batch_end``).
        self.in_batch_end = False
        self.resume_batch_end = False
        #: True while a validation inside fit has not produced its values yet: a checkpoint
        #: written then leaves that validation to the resumed run too.
        self.validation_incomplete = False
        #: The checkpoint's latest values, put back after the sanity check (which forgets
        #: what it logged, names the checkpoint may share).
        self.resume_latest: dict[str, float] | None = None
        #: While an evaluation runs inside fit: the training's RNG states, which it restores
        #: after itself (and which a checkpoint written meanwhile records).
        self.training_rng: dict[str, Any] | None = None
        #: How the processes agree on ``should_stop`` (at once with one process).
        self.stop_vote = self.profiler.timed_agreement(accelerator.agreement())
        self.num_val_batches: list[int | None] = []
        self.num_test_batches: list[int | None] = []
        self.handles: list[Any] = []
        if previous is None:  # a new run
            self.state = LoopState()
            self.optimizers: list[AcceleratedOptimizer] = []
            self.scheduler_configs: list[SchedulerConfig] = []
            self.num_training_batches: int | None = None
        else:  # an evaluation continues the run before it
            self.state = previous.state
            self.optimizers = previous.optimizers
            self.scheduler_configs = previous.scheduler_configs
            self.num_training_batches = previous.num_training_batches
        # Every run starts with empty metrics (Lightning): after a validate, callback_metrics
        # and logged_metrics show only what that validate logged.
        self.train_metrics = MetricStore()
        self.eval_metrics = MetricStore(shares_latest_with=self.train_metrics)
        self.logged_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}
        self.state.stage = stage
        self.active_metrics = self.train_metrics

    # --- set-up (after the setup hook, so what it changed in the module counts) ----------------
    def prepare_module(self, compile: bool | dict[str, Any], steps: tuple[str, ...]) -> None:
        """Place and wrap the module (``model``) and build the step functions the loops call
        (``steps``: the names of those this run calls, compiled under ``compile``)."""
        # Under DDP / FSDP the training steps run through the wrapper's forward.
        self.model, callers = self.accelerator.prepare_steps(self.module, steps)
        self.steps = StepFunctions.of(self.module, compile, steps, callers)

    def prepare_optimizers(self) -> None:
        """Prepare what ``configure_optimizers`` returns: ``optimizers``, ``scheduler_configs``.

        Automatic optimization steps exactly one optimizer. Under manual optimization there
        may be several; ``on_before_optimizer_step`` then fires just before each real step
        (after unscaling), through a hook on the real optimizer removed by ``release``.
        """
        module = self.module
        optimizers, schedulers = parse_optimizers(module.configure_optimizers())
        if module.automatic_optimization:
            check_automatic(optimizers, type(module).__name__)
        elif self.settings.gradient_clip_val is not None:
            raise MisconfigurationError(
                f"Trainer(gradient_clip_val={self.settings.gradient_clip_val}) clips in automatic "
                f"optimization only, and {type(module).__name__} uses manual optimization. Clip "
                "in training_step instead: self.clip_gradients(optimizer, gradient_clip_val=..., "
                "gradient_clip_algorithm='norm'), before optimizer.step()."
            )
        self.optimizers = [self.accelerator.prepare_optimizer(item) for item in optimizers]
        # Manual optimization may step one optimizer several times per batch (Lightning's
        # convention): the fp16 scale is updated after each step that leaves nothing pending.
        self.accelerator.optimizer_step.update_after_step = not module.automatic_optimization
        for config in schedulers:
            config.scheduler = self.accelerator.prepare_scheduler(config.scheduler)
        self.scheduler_configs = schedulers
        if not module.automatic_optimization and self.hooks["on_before_optimizer_step"]:
            for optimizer in self.optimizers:
                self.handles.append(
                    optimizer.register_step_pre_hook(
                        lambda _real, _args, _kwargs, optimizer=optimizer: self.fire(
                            "on_before_optimizer_step", optimizer
                        )
                    )
                )

    def release(self) -> None:
        """Remove the hooks this run and the accelerator put on the user's optimizers (they
        would keep the run alive through the user's objects)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.state.stage == "fit":
            for optimizer in self.optimizers:
                optimizer.release()

    # --- what the loops call ---------------------------------------------------------------
    def fire(self, event: str, *args: Any) -> None:
        """Call every hook of ``event`` (callbacks first, then the module)."""
        for hook in self.hooks[event]:
            hook(*args)

    def send_to_loggers(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record ``metrics`` in ``logged_metrics`` and write them at ``step`` (default: the
        current global step)."""
        if not metrics:
            return
        self.logged_metrics.update(metrics)
        if self.is_global_zero:
            step = self.state.global_step if step is None else step
            resumed = self.profiler.switch(CALLBACKS)  # not per step: at each flush
            for logger in self.loggers:
                logger.log_metrics(metrics, step)
            self.profiler.switch(resumed)

    def reduce_across_processes(self, tensor: Tensor, reduction: str) -> Tensor:
        """``tensor`` reduced over every process (the metric stores' reducer)."""
        result: Tensor = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction)
        return result

    @property
    def epoch_sync(self) -> EpochSync:
        """What the metric stores reduce over at epoch end: every process of the run."""
        timed = self.profiler.timed
        return EpochSync(
            world_size=self.accelerator.num_processes,
            all_reduce=timed(COLLECTIVES, self.reduce_across_processes),
            all_gather_object=timed(COLLECTIVES, distributed.all_gather_object),
            module=self.module,
        )

    def step_scheduler(self, config: SchedulerConfig) -> None:
        """Step one scheduler once: the Trainer's convention (Lightning's), on any number of
        processes, and also after a step the fp16 scaler skipped (the window ended with
        ``step()`` called: it counts as a step)."""
        scheduler = config.scheduler.scheduler  # the real one, not the accelerator's wrapper
        if config.needs_metric:
            metrics = self.train_metrics.latest()
            if config.monitor not in metrics:
                if not config.strict:
                    warnings.warn(
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; "
                        "with strict=False its step is skipped. Logged names: "
                        f"{sorted(metrics)}.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return
                raise MisconfigurationError(
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged. "
                    f"Logged names: {sorted(metrics)}. Log it, or give the scheduler dict "
                    '"strict": False to skip such steps with a warning.'
                )
            scheduler.step(metrics[config.monitor])
        else:
            scheduler.step()

    def backward(self, loss: Tensor, num_items: Tensor | int | None = None, **kwargs: Any) -> None:
        """``on_before_backward``, the accelerator's backward (window size, ``num_items``,
        fp16 scaling), ``on_after_backward``: automatic and manual optimization alike."""
        for hook in self.hooks["on_before_backward"]:
            hook(loss)
        resumed = self.profiler.switch(BACKWARD)
        self.accelerator.optimizer_step.backward(loss, num_items, kwargs)  # = accelerator.backward
        self.profiler.switch(resumed)
        for hook in self.hooks["on_after_backward"]:
            hook()

    def clip_gradients(
        self, optimizers: list[AcceleratedOptimizer], clip_value: float, algorithm: str
    ) -> None:
        """Clip what ``optimizers`` update now: every parameter of their current
        ``param_groups`` (layers unfrozen and groups added after fit started included)."""
        parameters = [
            parameter
            for optimizer in optimizers
            for group in optimizer.param_groups
            for parameter in group["params"]
        ]
        if len(optimizers) > 1:  # a parameter in two optimizers counts once
            parameters = list(dict.fromkeys(parameters))
        if algorithm == "norm":
            self.accelerator.clip_grad_norm_(parameters, clip_value)
        else:
            self.accelerator.clip_grad_value_(parameters, clip_value)

    def clip_optimizer(self, optimizer: Any, clip_value: Any, algorithm: Any) -> None:
        """``TrainModule.clip_gradients``: checked arguments, and nothing inside an
        accumulation window (like the optimizer's ``step``)."""
        value = check_clip_value(clip_value)
        algorithm = check_choice("gradient_clip_algorithm", algorithm or "norm", ("norm", "value"))
        prepared = next(
            (item for item in self.optimizers if optimizer is item or optimizer is item.optimizer),
            None,
        )
        if prepared is None:
            raise MisconfigurationError(
                f"clip_gradients got {type(optimizer).__name__}, which is not one of "
                "self.optimizers(); pass one of those."
            )
        if value is None or not self.accelerator.sync_gradients:
            return
        self.clip_gradients([prepared], value, algorithm)

    @property
    def validation_enabled(self) -> bool:
        """Whether fit has validation loaders, a validation_step and a non-zero limit."""
        return (
            bool(self.val_loaders)
            and overrides(self.module, "validation_step")
            and self.settings.limit_val_batches != 0
        )
