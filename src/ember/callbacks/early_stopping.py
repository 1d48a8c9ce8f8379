"""``EarlyStopping``: end fit when a monitored metric stops improving (or goes wrong)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ember.errors import MisconfigurationError, one_of
from ember.hooks import Callback

if TYPE_CHECKING:
    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer

_MODES = ("min", "max")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class EarlyStopping(Callback):
    """Stops fit when ``monitor`` has not improved for ``patience`` checks.

    The check runs after every validation run (not the sanity check). When fit has no
    validation at all, it runs at the end of every training epoch instead, so a training
    metric logged with ``on_epoch=True`` can be monitored.

    At each check, in this order, training stops when the value is NaN or infinite
    (``check_finite``); else the best value and ``wait_count`` are updated; then training
    stops when the value is better than ``stopping_threshold``, worse than
    ``divergence_threshold``, or did not improve for ``patience`` checks in a row.

    Args:
        monitor: the name in ``trainer.callback_metrics`` to watch, e.g. ``"val_loss"``.
        min_delta: an improvement is a change of more than this (>= 0) in the mode's direction.
        patience: how many checks without improvement to allow; 0 stops at the first one.
        mode: ``"min"`` (lower is better) or ``"max"``.
        stopping_threshold: stop as soon as the value is better than this.
        divergence_threshold: stop as soon as the value is worse than this.
        check_finite: stop when the value is NaN or infinite.

    Attributes:
        stopped_epoch: the epoch in which it stopped training (0 until then).
        wait_count: checks since the last improvement.
        best_score: the best value seen (``inf`` for "min", ``-inf`` for "max" before any).
        reason: why it stopped, in words (None until it stops).

    Examples:
        >>> import ember
        >>> from ember.callbacks import EarlyStopping
        >>> early_stopping = EarlyStopping(monitor="val_loss", patience=3, min_delta=0.01)
        >>> trainer = ember.Trainer(max_epochs=100, callbacks=[early_stopping], logger=False)
        >>> early_stopping.best_score, early_stopping.wait_count
        (inf, 0)

        ``trainer.fit(module, train_loader, val_loader)`` then stops once ``val_loss`` (logged
        by the module's ``validation_step``) has not dropped by more than 0.01 for 3
        validations in a row; ``early_stopping.reason`` says why it stopped.
    """

    monitors = True

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        mode: str = "min",
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise MisconfigurationError(
                f"`EarlyStopping(monitor={monitor!r})`: monitor must be the non-empty name of a "
                "logged metric, e.g. 'val_loss'."
            )
        if mode not in _MODES:
            raise MisconfigurationError(one_of("mode", mode, _MODES))
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise MisconfigurationError(
                f"`EarlyStopping(patience={patience!r})` is not supported: use an integer >= 0."
            )
        if not _is_number(min_delta) or not math.isfinite(min_delta) or min_delta < 0:
            raise MisconfigurationError(
                f"`EarlyStopping(min_delta={min_delta!r})` is not supported: use a finite "
                "number >= 0 (the direction comes from `mode`)."
            )
        for name, threshold in (
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
        ):
            if threshold is not None and (not _is_number(threshold) or math.isnan(threshold)):
                raise MisconfigurationError(
                    f"`EarlyStopping({name}={threshold!r})` is not supported: use a number or None."
                )
        if not isinstance(check_finite, bool):
            raise MisconfigurationError(
                f"`EarlyStopping(check_finite={check_finite!r})` is not supported: use True or False."
            )
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.patience = patience
        self.mode = mode
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_finite = check_finite
        self.wait_count = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopped_epoch = 0
        self.reason: str | None = None
        self._check_after_train_epoch = False
        self._stopped_this_fit = False

    @property
    def state_key(self) -> str:
        # Two EarlyStoppings on different metrics or modes keep separate states.
        identity = {"monitor": self.monitor, "mode": self.mode}
        return f"{type(self).__qualname__}{identity!r}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "best_score": self.best_score,
            "stopped_epoch": self.stopped_epoch,
            "patience": self.patience,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict["wait_count"])
        self.best_score = float(state_dict["best_score"])
        self.stopped_epoch = int(state_dict["stopped_epoch"])
        self.patience = int(state_dict["patience"])

    # --- events ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._stopped_this_fit = False

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._check_after_train_epoch = not trainer.enable_validation

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._check_after_train_epoch:
            self._check(trainer)

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        # The sanity check's values are discarded: nothing there to judge.
        if not trainer.sanity_checking and trainer.state.stage == "fit":
            self._check(trainer)

    # --- the decision ------------------------------------------------------------------------
    def _better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than

    def _check(self, trainer: Trainer) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise MisconfigurationError(
                f"EarlyStopping(monitor={self.monitor!r}) found no metric named "
                f"{self.monitor!r}. Logged names: {sorted(metrics)}. Log it with "
                f"self.log({self.monitor!r}, value) or monitor one of those names."
            )
        reason = self._evaluate(float(metrics[self.monitor]))
        stop = reason is not None
        if trainer.world_size > 1:
            # Every process must stop together; one that stops alone leaves the others
            # waiting in a collective.
            flag = torch.tensor(float(stop), device=trainer.accelerator.device)
            stop = bool(trainer.accelerator.reduce(flag, "max").item())
        if not stop or self._stopped_this_fit:
            return
        self._stopped_this_fit = True
        self.stopped_epoch = trainer.current_epoch
        self.reason = reason or "another process decided to stop."
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(f"EarlyStopping: {self.reason} Stopping after step {trainer.global_step}.")

    def _evaluate(self, value: float) -> str | None:
        """Update the state with ``value``; return why training should stop, or None."""
        name = self.monitor
        if self.check_finite and not math.isfinite(value):
            return f"{name}={value} is not finite; the best value was {self.best_score:.6g}."
        step = -self.min_delta if self.mode == "min" else self.min_delta
        improved = self._better(value, self.best_score + step)
        if improved:
            self.best_score = value
            self.wait_count = 0
        else:
            self.wait_count += 1
        better, worse = ("below", "above") if self.mode == "min" else ("above", "below")
        if self.stopping_threshold is not None and self._better(value, self.stopping_threshold):
            return f"{name}={value:.6g} is {better} stopping_threshold={self.stopping_threshold}."
        if self.divergence_threshold is not None and self._better(self.divergence_threshold, value):
            return (
                f"{name}={value:.6g} is {worse} divergence_threshold={self.divergence_threshold}."
            )
        if not improved and self.wait_count >= self.patience:
            return (
                f"{name} did not improve by more than {self.min_delta:g} in {self.wait_count} "
                f"checks in a row (best {self.best_score:.6g})."
            )
        return None
