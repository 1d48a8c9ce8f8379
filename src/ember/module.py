"""``TrainModule``: the user's side of training.

Subclass it, build layers in ``__init__``, and write ``training_step``, optionally
``validation_step`` / ``test_step`` / ``predict_step``, and ``configure_optimizers``.
Inside those, ``self.log`` records metrics and ``self.trainer`` / ``self.device`` /
``self.global_step`` / ``self.current_epoch`` tell where the run stands.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from ember.errors import CheckpointError, MisconfigurationError
from ember.hooks import ModuleHooks

if TYPE_CHECKING:
    from ember.loggers.base import Logger
    from ember.trainer.trainer import Trainer

ModuleT = TypeVar("ModuleT", bound="TrainModule")


class HyperParameters(dict[str, Any]):
    """A dict whose keys also read as attributes: ``self.hparams.lr``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"No hyperparameter {name!r}; saved: {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class TrainModule(nn.Module, ModuleHooks):
    """A ``torch.nn.Module`` that knows how to train itself under a ``Trainer``.

    Build the layers in ``__init__`` and write ``training_step`` and
    ``configure_optimizers``; ``validation_step``, ``test_step`` and ``predict_step`` are
    optional. ``self.log`` records metrics; ``self.save_hyperparameters()`` keeps the
    ``__init__`` arguments for the loggers and for ``load_from_checkpoint``. Every event of
    the loop (``on_train_epoch_start``, ``on_before_optimizer_step``, ...) is a method to
    override, listed below under ``ModuleHooks``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> class Regression(ember.TrainModule):
        ...     def __init__(self, lr: float = 0.1) -> None:
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...         self.layer = nn.Linear(3, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         loss = nn.functional.mse_loss(self.layer(x), y)
        ...         self.log("train_loss", loss)
        ...         return loss
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        >>> x = torch.randn(64, 3)
        >>> loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16)
        >>> trainer = ember.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
        ...                         enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Regression(lr=0.1), loader)
        >>> trainer.global_step  # 2 epochs of 4 batches
        8
        >>> sorted(trainer.callback_metrics)
        ['train_loss']
    """

    _trainer: Trainer | None
    hparams: HyperParameters
    #: False: ``training_step`` does its own backward and steps (manual optimization).
    automatic_optimization: bool = True

    def __init__(self) -> None:
        super().__init__()
        # Plain attributes (object.__setattr__), so nn.Module does not register them.
        object.__setattr__(self, "_trainer", None)
        object.__setattr__(self, "hparams", HyperParameters())

    # --- what the user writes -------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """Return the loss (a scalar tensor), a dict with ``"loss"`` (and optionally
        ``"num_items"``: the loss is then a sum over that many items), or None to skip."""
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        """Compute and ``self.log`` validation metrics for one batch."""
        raise NotImplementedError

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """Compute and ``self.log`` test metrics for one batch."""
        raise NotImplementedError

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """Return the prediction for one batch; by default ``self(batch)``."""
        return self(batch)

    def configure_optimizers(self) -> Any:
        """Return an optimizer; ``(optimizer, scheduler)``; or ``{"optimizer": ...,
        "lr_scheduler": scheduler | {"scheduler": ..., "interval": "step" | "epoch",
        "frequency": 1}}``."""
        raise NotImplementedError

    def configure_callbacks(self) -> Any:
        """Callbacks this module needs (a ``Callback`` or a list), added to the Trainer's at
        every fit / validate / test / predict. One of the same type as (or a subclass of) a
        Trainer callback replaces it; checkpoint writers still run last."""
        return []

    def train_dataloader(self) -> Any:
        """The training loader, when none is passed to ``fit``."""
        return None

    def val_dataloader(self) -> Any:
        """The validation loader(s), when none is passed to ``fit`` / ``validate``."""
        return None

    def test_dataloader(self) -> Any:
        """The test loader(s), when none is passed to ``test``."""
        return None

    def predict_dataloader(self) -> Any:
        """The prediction loader(s), when none is passed to ``predict``."""
        return None

    # --- where the run stands -----------------------------------------------------------------
    @property
    def trainer(self) -> Trainer:
        """The trainer running this module (an error outside ``fit`` / ``validate`` / ...)."""
        if self._trainer is None:
            raise MisconfigurationError(
                f"{type(self).__name__} is not attached to a Trainer. `self.trainer` and "
                "`self.log` work inside Trainer.fit / validate / test / predict."
            )
        return self._trainer

    @property
    def logger(self) -> Logger | None:
        """The trainer's first logger (``None`` without a trainer or without loggers)."""
        return self._trainer.logger if self._trainer is not None else None

    @property
    def loggers(self) -> list[Logger]:
        """The trainer's loggers (``[]`` without a trainer)."""
        return list(self._trainer.loggers) if self._trainer is not None else []

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the global rank zero process only (every call prints without a
        trainer), so a message appears once in a run of several processes."""
        if self._trainer is None or self._trainer.is_global_zero:
            print(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """The device the module's parameters are on."""
        for parameter in self.parameters():
            return parameter.device
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far (0 without a trainer)."""
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def current_epoch(self) -> int:
        """The epoch being run (0 without a trainer)."""
        return self._trainer.current_epoch if self._trainer is not None else 0

    # --- manual optimization ---------------------------------------------------------------------
    def optimizers(self) -> Any:
        """The prepared optimizer (or a list, when ``configure_optimizers`` returned several).

        Their ``step()`` and ``zero_grad()`` do nothing until the accumulation window's last
        batch; ``step()`` unscales (fp16) and normalises the gradient first.
        """
        optimizers = self.trainer.optimizers
        return optimizers[0] if len(optimizers) == 1 else list(optimizers)

    def lr_schedulers(self) -> Any:
        """The schedulers of ``configure_optimizers`` (one, a list, or None). Each ``step()``
        advances the schedule once, on any number of processes (Lightning's convention)."""
        schedulers = [config.scheduler.scheduler for config in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(
        self, loss: Tensor, num_items: Tensor | int | None = None, **kwargs: Any
    ) -> None:
        """Backpropagate ``loss`` as the Trainer would: divided by the accumulation window's
        size (or, with ``num_items``, normalised by the window's item count at the step),
        scaled under fp16, between ``on_before_backward`` and ``on_after_backward``."""
        if self.automatic_optimization:
            raise MisconfigurationError(
                f"manual_backward is for manual optimization, and {type(self).__name__} uses "
                "automatic optimization (the Trainer calls backward on the returned loss). "
                "Set `self.automatic_optimization = False` in __init__ and step the optimizers "
                "in training_step, or return the loss instead of calling manual_backward."
            )
        self.trainer.run_context.backward(loss, num_items=num_items, **kwargs)

    def clip_gradients(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradient of ``optimizer``'s parameters (unscaled first under fp16).

        Args:
            optimizer: one of ``self.optimizers()``.
            gradient_clip_val: the largest norm (or value); None or 0 does nothing.
            gradient_clip_algorithm: "norm" (default: the total norm) or "value".

        Inside an accumulation window it does nothing until the window's last batch, like
        the optimizer's ``step``.
        """
        self.trainer.run_context.clip_optimizer(
            optimizer, gradient_clip_val, gradient_clip_algorithm
        )

    def toggle_optimizer(self, optimizer: Any) -> None:
        """Let only ``optimizer``'s parameters require gradients (a GAN's generator step
        leaves the discriminator's weights without gradients); ``untoggle_optimizer`` undoes
        it."""
        own = {id(p) for group in optimizer.param_groups for p in group["params"]}
        saved: dict[int, tuple[Tensor, bool]] = {}
        for other in self.trainer.optimizers:
            for group in other.param_groups:
                for parameter in group["params"]:
                    if id(parameter) not in own and id(parameter) not in saved:
                        saved[id(parameter)] = (parameter, parameter.requires_grad)
                        parameter.requires_grad_(False)
        object.__setattr__(self, "_toggled", saved)

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Give back ``requires_grad`` as it was before ``toggle_optimizer``."""
        for parameter, requires_grad in getattr(self, "_toggled", {}).values():
            parameter.requires_grad_(requires_grad)
        object.__setattr__(self, "_toggled", {})

    # --- logging -------------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Tensor | float | Any,
        *,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        prog_bar: bool = False,
        logger: bool = True,
        reduce_fx: str = "mean",
        sync_dist: bool = False,
        batch_size: int | None = None,
    ) -> None:
        """Record a metric.

        Args:
            name: the key in ``trainer.callback_metrics`` and in the loggers.
            value: a number, a one-element tensor, or a ``torchmetrics.Metric`` (computed
                and reset at epoch end).
            on_step: record the value of this step (default: True in training hooks,
                False in validation/test).
            on_epoch: reduce over the epoch (default: the opposite). Both give two keys,
                ``name_step`` and ``name_epoch``.
            prog_bar: show it in the progress bar.
            logger: send it to the loggers.
            reduce_fx: "mean" (weighted by batch size), "sum", "min" or "max".
            sync_dist: reduce over processes at epoch end.
            batch_size: the weight of this value in the mean (inferred from the batch).
        """
        # `self.trainer` raises the "not attached" error. Positional arguments: this runs
        # every step, and keyword matching costs more.
        (self._trainer or self.trainer).metric_store.log(
            name, value, on_step, on_epoch, prog_bar, logger, reduce_fx, sync_dist, batch_size
        )

    def log_dict(self, metrics: Mapping[str, Any] | Any, **kwargs: Any) -> None:
        """``self.log`` for every item of ``metrics``, with the same keyword arguments.

        ``metrics`` is a mapping of name -> value, or a ``torchmetrics.MetricCollection``
        (each metric logged under its name in the collection, prefix and postfix included).
        """
        torchmetrics = sys.modules.get("torchmetrics")  # never imported by ember itself
        collection = torchmetrics is not None and isinstance(metrics, torchmetrics.MetricCollection)
        if not (isinstance(metrics, Mapping) or collection):
            raise MisconfigurationError(
                "self.log_dict expects a dict of name -> value or a torchmetrics."
                f"MetricCollection, got {type(metrics).__name__}."
            )
        for name, value in metrics.items():
            self.log(name, value, **kwargs)

    # --- hyperparameters ---------------------------------------------------------------------
    def save_hyperparameters(self, *names: str, ignore: list[str] | str | None = None) -> None:
        """Record the arguments of the calling ``__init__`` in ``self.hparams``.

        Args:
            names: record only these arguments (default: all of them).
            ignore: arguments to leave out (modules passed in, say).

        The hyperparameters are sent to every logger when training starts (and saved in
        checkpoints).
        """
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:  # pragma: no cover - only without frame support
            raise MisconfigurationError("save_hyperparameters could not inspect its caller.")
        code = caller.f_code
        count = code.co_argcount + code.co_kwonlyargcount
        arguments = list(code.co_varnames[:count])
        values = caller.f_locals
        collected: dict[str, Any] = {}
        for argument in arguments:
            if argument in ("self", "__class__"):
                continue
            collected[argument] = values[argument]
        if code.co_flags & inspect.CO_VARKEYWORDS:
            collected.update(
                values[code.co_varnames[count + bool(code.co_flags & inspect.CO_VARARGS)]]
            )
        ignored = {ignore} if isinstance(ignore, str) else set(ignore or ())
        if names:
            unknown = [name for name in names if name not in collected]
            if unknown:
                raise MisconfigurationError(
                    f"save_hyperparameters got {unknown}, which are not arguments of "
                    f"{type(self).__name__}.__init__; its arguments are {sorted(collected)}."
                )
            collected = {name: collected[name] for name in names}
        self.hparams.update({key: value for key, value in collected.items() if key not in ignored})

    @classmethod
    def load_from_checkpoint(
        cls: type[ModuleT], path: str | os.PathLike[str], **overrides: Any
    ) -> ModuleT:
        """Build the module from a checkpoint directory and load its weights.

        The module is built with the hparams the checkpoint holds (``save_hyperparameters``)
        updated by ``overrides``; then ``on_load_checkpoint(state)`` runs and the weights are
        loaded strictly. As in Lightning, it comes back on the CPU in training mode: call
        ``.eval()`` before inference.

        Raises:
            CheckpointError: the checkpoint is missing, truncated or corrupt, or its weights
                do not fit this module (the missing and unexpected keys are listed).
            MisconfigurationError: an override is not an argument of ``__init__``, or an
                argument without a default has no value.
        """
        from ember.checkpoint.files import check_keys, read_checkpoint

        checkpoint = read_checkpoint(path)
        module = cls(**_init_arguments(cls, checkpoint.state.get("hparams") or {}, overrides))
        module.on_load_checkpoint(checkpoint.state)
        assert checkpoint.weights is not None
        expected = list(module.state_dict())
        check_keys(checkpoint.path, expected, list(checkpoint.weights), cls.__name__)
        try:
            module.load_state_dict(checkpoint.weights)
        except RuntimeError as error:  # the same keys, other shapes
            raise CheckpointError(
                f"The checkpoint {str(checkpoint.path)!r} does not fit {cls.__name__}: {error}"
            ) from error
        return module

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainModule:
        # A copy (an EMA model, say) must not drag the trainer along.
        trainer = self._trainer
        object.__setattr__(self, "_trainer", None)
        try:
            cls = type(self)
            copy = cls.__new__(cls)
            memo[id(self)] = copy
            for key, value in self.__dict__.items():
                object.__setattr__(copy, key, _deepcopy(value, memo))
            return copy
        finally:
            object.__setattr__(self, "_trainer", trainer)


def _init_arguments(
    cls: type[TrainModule], hparams: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The ``__init__`` arguments ``load_from_checkpoint`` builds ``cls`` with: the saved
    hparams that are arguments (all of them when it takes ``**kwargs``), then ``overrides``."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # not self
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return {**hparams, **overrides}
    named = {
        parameter.name: parameter
        for parameter in parameters
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(overrides) - set(named))
    if unknown:
        raise MisconfigurationError(
            f"load_from_checkpoint got {unknown}, which are not arguments of "
            f"{cls.__name__}.__init__; its arguments are {sorted(named)}."
        )
    arguments = {key: value for key, value in hparams.items() if key in named}
    arguments.update(overrides)
    missing = [
        name
        for name, parameter in named.items()
        if parameter.default is parameter.empty and name not in arguments
    ]
    if missing:
        raise MisconfigurationError(
            f"load_from_checkpoint has no value for {missing}, argument(s) of "
            f"{cls.__name__}.__init__ that the checkpoint's hparams do not hold: pass them "
            f"(load_from_checkpoint(path, {missing[0]}=...)), or call "
            "self.save_hyperparameters() in __init__ so checkpoints record them."
        )
    return arguments


def _deepcopy(value: Any, memo: dict[int, Any]) -> Any:
    import copy

    return copy.deepcopy(value, memo)


def overrides(module: nn.Module, method: str) -> bool:
    """Whether ``module``'s class overrides ``TrainModule.<method>``."""
    own = getattr(type(module), method, None)
    return own is not None and own is not getattr(TrainModule, method, None)
