"""``LearningRateMonitor``: logs the optimizer's learning rate, per step or per epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ember.errors import MisconfigurationError
from ember.hooks import Callback

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer

_INTERVALS = (None, "step", "epoch")


class LearningRateMonitor(Callback):
    """Logs the learning rate of the Trainer's optimizer as ``lr-<OptimizerClass>``, or
    ``lr-<name>`` when its scheduler dict has a ``"name"``.

    With one parameter group the name is e.g. ``lr-AdamW``; with several, each group gets
    its own name: ``lr-AdamW/pg1``, ``lr-AdamW/pg2``, ... A group with a ``"name"`` key is
    logged under it: ``lr-AdamW/backbone`` (also when it is the only group), as in
    Lightning. The values go through ``self.log``, so they reach
    ``trainer.callback_metrics`` and the loggers like any other metric.

    - ``"step"``: every optimizer step logs the rate that step used (read just before
      ``optimizer.step()``), sent to the loggers every ``log_every_n_steps`` steps with the
      step's other values.
    - ``"epoch"``: once per epoch, the rate in force when the epoch starts.
    - ``None``: ``"step"`` when a scheduler steps per step, else ``"epoch"``.

    It needs a logger: fit raises ``MisconfigurationError`` when the Trainer has none.

    Args:
        logging_interval: None, "step" or "epoch".

    Examples:
        ```python
        from ember import Trainer
        from ember.callbacks import LearningRateMonitor
        from ember.loggers import CSVLogger

        trainer = Trainer(
            max_epochs=10,
            callbacks=[LearningRateMonitor(logging_interval="step")],
            logger=CSVLogger("logs"),  # it needs a logger
        )
        trainer.fit(module, train_loader)  # metrics.csv gains a column "lr-AdamW"
        ```
    """

    def __init__(self, logging_interval: str | None = None) -> None:
        if logging_interval not in _INTERVALS:
            raise MisconfigurationError(
                f"`logging_interval={logging_interval!r}` is not supported. Accepted values: "
                "None, 'step', 'epoch'."
            )
        self.logging_interval = logging_interval
        #: the interval used in the current fit ("step" or "epoch"), decided at fit start
        self.interval: str | None = logging_interval
        #: Per optimizer (by the identity of the real one): its base name and group names.
        self._names: dict[int, tuple[str, list[str]]] = {}
        #: The ``"name"`` of each optimizer's scheduler dict (by the real optimizer's id).
        self._scheduler_names: dict[int, str] = {}

    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise MisconfigurationError(
                "LearningRateMonitor needs a logger to write the learning rate to, but the "
                "Trainer has none. Pass one, e.g. `Trainer(logger=True)` or "
                "`Trainer(logger=CSVLogger('logs'))`, or remove the callback."
            )

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        # Schedulers exist only after configure_optimizers, i.e. after setup.
        interval = self.logging_interval
        if interval is None:
            schedulers = trainer.lr_scheduler_configs
            interval = "step" if any(c.interval == "step" for c in schedulers) else "epoch"
        self.interval = interval
        self._names = {}
        self._scheduler_names = {
            id(config.scheduler.optimizer): config.name
            for config in trainer.lr_scheduler_configs
            if config.name is not None
        }

    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self.interval == "epoch":
            for optimizer in trainer.optimizers:
                # One value per epoch: batch_size=1 keeps the epoch "mean" equal to it.
                self._log(module, optimizer, on_step=False, on_epoch=True, batch_size=1)

    def on_before_optimizer_step(
        self, trainer: Trainer, module: TrainModule, optimizer: Optimizer
    ) -> None:
        if self.interval == "step":
            # Schedulers step after optimizer.step(): this is the rate the step uses.
            self._log(module, optimizer, on_step=True, on_epoch=False, batch_size=None)

    def names(self, optimizer: Optimizer) -> list[str]:
        """The logged name of each parameter group of ``optimizer`` (wrapped or raw).

        Several optimizers of one class (manual optimization) get ``lr-Adam``, ``lr-Adam-1``,
        ... in the order they are first seen, as in Lightning; a scheduler's ``"name"``
        replaces ``lr-<class>`` with ``lr-<name>``, a group's ``"name"`` its ``pg<i>``.
        """
        raw = getattr(optimizer, "optimizer", optimizer)  # ember's AcceleratedOptimizer wraps it
        groups = raw.param_groups
        known = self._names.get(id(raw))
        if known is None:
            named = self._scheduler_names.get(id(raw))
            base = f"lr-{named}" if named is not None else f"lr-{type(raw).__name__}"
            taken = {name for name, _ in self._names.values()}
            suffix = 0
            while (f"{base}-{suffix}" if suffix else base) in taken:
                suffix += 1
            known = (f"{base}-{suffix}" if suffix else base, [])
        base, names = known
        if len(names) != len(groups):  # computed once, again only if groups were added
            names = _group_names(base, groups)
        self._names[id(raw)] = (base, names)
        return names

    def _log(
        self,
        module: TrainModule,
        optimizer: Optimizer,
        on_step: bool,
        on_epoch: bool,
        batch_size: int | None,
    ) -> None:
        for name, group in zip(self.names(optimizer), optimizer.param_groups, strict=True):
            lr: Any = group["lr"]
            # A tensor learning rate stays a tensor: converting it here would sync the device.
            value = lr.detach() if isinstance(lr, Tensor) else float(lr)
            module.log(
                name,
                value,
                on_step=on_step,
                on_epoch=on_epoch,
                prog_bar=False,
                logger=True,
                batch_size=batch_size,
            )


def _group_names(base: str, groups: list[dict[str, Any]]) -> list[str]:
    """``base`` for one unnamed group; else ``base/<group name>``, ``base/pg<i>`` for a group
    without a ``"name"`` (i from 1), as Lightning names them."""
    if len(groups) == 1 and groups[0].get("name") is None:
        return [base]
    suffixes = [str(group.get("name", f"pg{index}")) for index, group in enumerate(groups, 1)]
    repeated = sorted({suffix for suffix in suffixes if suffixes.count(suffix) > 1})
    if repeated:
        raise MisconfigurationError(
            f"LearningRateMonitor: the optimizer logged as {base!r} has two parameter groups "
            f"named {repeated[0]!r}; each group's rate needs its own name. Give the groups "
            "distinct 'name' keys (or none: they are then numbered pg1, pg2, ...)."
        )
    return [f"{base}/{suffix}" for suffix in suffixes]
