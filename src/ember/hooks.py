"""Every event of the training loop, as documented no-op methods.

The loop fires events by name. For each event it first calls the method of every callback
(in the order they were given, with ``trainer, module`` in front of the arguments), then the
module's method of the same name. Two exceptions, as in Lightning: callbacks that write
checkpoints (``writes_checkpoints``, e.g. ModelCheckpoint) run after all other callbacks, so a
checkpoint holds their state of this step; and at ``on_train_epoch_end`` the monitoring
callbacks (``monitors``: EarlyStopping, ModelCheckpoint) run after the module's hook, so they
see what it logs there. ``docs/hooks.md`` lists the full order; in pseudocode::

    setup("fit"); configure_optimizers()
    on_fit_start
    sanity check: on_validation_start ... on_validation_end  (num_sanity_val_steps batches)
    on_train_start
    for epoch:
        on_train_epoch_start
        for batch_idx, batch in train loader:
            # as each batch is drawn (every loader, module only; see TRANSFER_HOOKS):
            # on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer
            on_train_batch_start(batch, batch_idx)
            loss = training_step(batch, batch_idx)
            on_before_backward(loss); backward; on_after_backward
            if last batch of the accumulation window:
                on_before_optimizer_step(optimizer)   # gradients unscaled, before clipping
                clip; optimizer.step()
                on_before_zero_grad(optimizer); optimizer.zero_grad()
                step-interval schedulers
            on_train_batch_end(outputs, batch, batch_idx)
            if validation is due: on_validation_start ... on_validation_end
        on_train_epoch_end        # other callbacks, the module, then monitoring callbacks
        epoch-interval schedulers
    on_train_end
    on_fit_end
    teardown("fit")

    validate / test / predict:
    setup(stage); on_<stage>_start; on_<stage>_epoch_start
    for batch: on_<stage>_batch_start; <stage>_step; on_<stage>_batch_end
    on_<stage>_epoch_end; on_<stage>_end; teardown(stage)

An exception during fit/validate/test/predict calls ``on_exception`` on every callback.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ember.accelerator.transfer import TransferHooks, move_to_device

if TYPE_CHECKING:
    from torch import Tensor
    from torch.optim import Optimizer

    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer

# The order here is the order of docs/hooks.md; tests/test_hooks.py pins it.
EVENTS: tuple[str, ...] = (
    "setup",
    "teardown",
    "on_fit_start",
    "on_fit_end",
    "on_train_start",
    "on_train_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_start",
    "on_validation_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_start",
    "on_test_end",
    "on_test_epoch_start",
    "on_test_epoch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_start",
    "on_predict_end",
    "on_predict_epoch_start",
    "on_predict_epoch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_exception",
)


class Callback:
    """Base class of callbacks: override the events you need; the rest do nothing.

    A callback reads the trainer's state and ``trainer.callback_metrics``; it never changes
    the batch or the loss. What it returns from ``state_dict`` is saved in checkpoints under
    ``state_key`` and handed back to ``load_state_dict`` on resume.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> class PrintLoss(ember.Callback):
        ...     def on_train_epoch_end(self, trainer, module):
        ...         loss = trainer.callback_metrics["loss"]
        ...         print(f"epoch {trainer.current_epoch}: loss below 100: {loss < 100}")
        >>> class Regression(ember.TrainModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.layer = nn.Linear(3, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        ...         self.log("loss", loss, on_epoch=True)
        ...         return loss
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> x = torch.randn(32, 3)
        >>> loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
        >>> trainer = ember.Trainer(max_epochs=2, callbacks=[PrintLoss()], logger=False,
        ...                         enable_checkpointing=False, enable_progress_bar=False,
        ...                         enable_model_summary=False)
        >>> trainer.fit(Regression(), loader)
        epoch 0: loss below 100: True
        epoch 1: loss below 100: True
    """

    #: Judges metrics: at ``on_train_epoch_end`` it runs after the module's hook (which may
    #: log what it judges), as EarlyStopping and ModelCheckpoint do.
    monitors: ClassVar[bool] = False
    #: Writes checkpoints: at every event it runs after all other callbacks, so a checkpoint
    #: it writes holds their state of this step.
    writes_checkpoints: ClassVar[bool] = False

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint (its class name by default)."""
        return type(self).__qualname__

    def idle_events(self) -> frozenset[str]:
        """Events this callback overrides but, as configured, has nothing to do at: they are
        not called at all (a per-batch event costs every step). Asked once per run."""
        return frozenset()

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue after a resume."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        """Before anything runs for ``stage`` ("fit", "validate", "test" or "predict")."""

    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        """After everything for ``stage`` has run (also after an exception)."""

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        """Fit begins; optimizers exist and the module is on its device."""

    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None:
        """Fit ended normally."""

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        """Training begins (after the sanity check)."""

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        """Training ended."""

    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        """A training epoch begins."""

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        """A training epoch ended (after its last validation run)."""

    def on_train_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
    ) -> None:
        """Before ``training_step``; ``batch`` is already on the device."""

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the batch (and the optimizer step, when the batch closed a window)."""

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        """A validation run begins (the module is in eval mode, gradients are off)."""

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        """A validation run ended; its metrics are in ``callback_metrics``."""

    def on_validation_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        """Validation over the loaders begins."""

    def on_validation_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        """Validation over the loaders ended (metrics are reduced just after this)."""

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        module: TrainModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Before ``validation_step``."""

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """After ``validation_step``."""

    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        """A test run begins."""

    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None:
        """A test run ended."""

    def on_test_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        """Testing over the loaders begins."""

    def on_test_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        """Testing over the loaders ended."""

    def on_test_batch_start(
        self,
        trainer: Trainer,
        module: TrainModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Before ``test_step``."""

    def on_test_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """After ``test_step``."""

    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        """A predict run begins."""

    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None:
        """A predict run ended."""

    def on_predict_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        """Prediction over the loaders begins."""

    def on_predict_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        """Prediction over the loaders ended."""

    def on_predict_batch_start(
        self,
        trainer: Trainer,
        module: TrainModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Before ``predict_step``."""

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """After ``predict_step``."""

    def on_before_backward(self, trainer: Trainer, module: TrainModule, loss: Tensor) -> None:
        """Before ``backward``; ``loss`` is the value ``training_step`` returned."""

    def on_after_backward(self, trainer: Trainer, module: TrainModule) -> None:
        """After ``backward``; gradients may still be scaled and are not yet complete
        until the last batch of the accumulation window."""

    def on_before_optimizer_step(
        self, trainer: Trainer, module: TrainModule, optimizer: Optimizer
    ) -> None:
        """The window's gradient is complete and unscaled; clipping comes next."""

    def on_before_zero_grad(
        self, trainer: Trainer, module: TrainModule, optimizer: Optimizer
    ) -> None:
        """After ``optimizer.step()``, before the gradients are cleared."""

    def on_save_checkpoint(
        self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint is about to be written; add to ``checkpoint`` what you need."""

    def on_load_checkpoint(
        self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint was read; take from ``checkpoint`` what you stored."""

    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        """fit/validate/test/predict is about to re-raise ``exception``."""


class ModuleHooks:
    """The same events for ``TrainModule``, without the ``trainer, module`` arguments."""

    def setup(self, stage: str) -> None:
        """Before anything runs for ``stage``; a good place to build layers lazily."""

    def teardown(self, stage: str) -> None:
        """After everything for ``stage`` has run."""

    def on_fit_start(self) -> None:
        """Fit begins."""

    def on_fit_end(self) -> None:
        """Fit ended."""

    def on_train_start(self) -> None:
        """Training begins."""

    def on_train_end(self) -> None:
        """Training ended."""

    def on_train_epoch_start(self) -> None:
        """A training epoch begins."""

    def on_train_epoch_end(self) -> None:
        """A training epoch ended."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Before ``training_step``."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the batch."""

    def on_validation_start(self) -> None:
        """A validation run begins."""

    def on_validation_end(self) -> None:
        """A validation run ended."""

    def on_validation_epoch_start(self) -> None:
        """Validation over the loaders begins."""

    def on_validation_epoch_end(self) -> None:
        """Validation over the loaders ended."""

    def on_validation_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Before ``validation_step``."""

    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """After ``validation_step``."""

    def on_test_start(self) -> None:
        """A test run begins."""

    def on_test_end(self) -> None:
        """A test run ended."""

    def on_test_epoch_start(self) -> None:
        """Testing over the loaders begins."""

    def on_test_epoch_end(self) -> None:
        """Testing over the loaders ended."""

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Before ``test_step``."""

    def on_test_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """After ``test_step``."""

    def on_predict_start(self) -> None:
        """A predict run begins."""

    def on_predict_end(self) -> None:
        """A predict run ended."""

    def on_predict_epoch_start(self) -> None:
        """Prediction over the loaders begins."""

    def on_predict_epoch_end(self) -> None:
        """Prediction over the loaders ended."""

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Before ``predict_step``."""

    def on_predict_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """After ``predict_step``."""

    def on_before_backward(self, loss: Tensor) -> None:
        """Before ``backward``."""

    def on_after_backward(self) -> None:
        """After ``backward``."""

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """The window's gradient is complete and unscaled; clipping comes next."""

    def on_before_zero_grad(self, optimizer: Optimizer) -> None:
        """After ``optimizer.step()``, before the gradients are cleared."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint is about to be written."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint was read."""

    def on_exception(self, exception: BaseException) -> None:
        """fit/validate/test/predict is about to re-raise ``exception``."""

    # --- batch transfer: the module only; each returns the batch to pass on -----------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A batch just drawn from a loader the Trainer prepared, still where the loader put
        it (the CPU, usually); return it, changed or not. ``dataloader_idx``: the loader's
        index (0 for the training loader)."""
        return batch

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move ``batch`` to ``device`` and return it. The default moves every tensor in
        dicts, lists, tuples, namedtuples, dataclasses and objects with a ``.to`` method;
        override it for a batch type it cannot walk."""
        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The batch on the device (GPU augmentation goes here); return it. The precision's
        input cast (``bf16-true``) comes after this hook."""
        return batch


#: The batch-transfer hooks of ``ModuleHooks``, in the order they run on each batch. They
#: are not events: callbacks do not have them (callbacks never touch the batch).
TRANSFER_HOOKS: tuple[str, ...] = (
    "on_before_batch_transfer",
    "transfer_batch_to_device",
    "on_after_batch_transfer",
)


def transfer_hooks(module: ModuleHooks, dataloader_idx: int) -> TransferHooks | None:
    """The batch-transfer hooks ``module`` overrides, for the loader ``dataloader_idx``
    (None when it overrides none: its batches then cost nothing more)."""
    overridden = [
        getattr(module, name)
        if getattr(type(module), name) is not getattr(ModuleHooks, name)
        else None
        for name in TRANSFER_HOOKS
    ]
    if all(hook is None for hook in overridden):
        return None
    before, to_device, after = overridden
    return TransferHooks(before, to_device, after, dataloader_idx)


def collect_hooks(
    callbacks: list[Callback],
    module: ModuleHooks,
    trainer: Any,
    timed: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
) -> dict[str, tuple[Callable[..., Any], ...]]:
    """For each event, the overridden methods to call: callbacks first, then the module.

    The callbacks keep the order they were given, except that checkpoint writers come after
    all the others; at ``on_train_epoch_end`` the monitoring callbacks (and writers) come
    after the module. Methods left at their no-op default are not called at all, so an unused
    event costs one empty loop. ``timed``: wraps each method to charge its time to the
    profiler's "callbacks" part (``Trainer(profiler=...)``); None: the methods themselves.
    """
    # A stable sort: writers move to the end, every other order is kept.
    ordered = sorted(callbacks, key=lambda callback: _flag(callback, "writes_checkpoints"))
    hooks: dict[str, tuple[Callable[..., Any], ...]] = {}
    for event in EVENTS:
        late = event in _MONITORS_AFTER_MODULE
        before: list[Callable[..., Any]] = []
        after: list[Callable[..., Any]] = []
        for callback in ordered:
            if getattr(type(callback), event) is getattr(Callback, event):
                continue
            if event in callback.idle_events():  # configured not to need it: not called
                continue
            monitoring = _flag(callback, "monitors") or _flag(callback, "writes_checkpoints")
            (after if late and monitoring else before).append(
                partial(getattr(callback, event), trainer, module)
            )
        if getattr(type(module), event, None) is not getattr(ModuleHooks, event):
            before.append(getattr(module, event))
        if timed is not None:
            before, after = [timed(hook) for hook in before], [timed(hook) for hook in after]
        if late:
            # Fired apart, so the loop can reduce what the module logged there first.
            hooks[event], hooks[monitors_of(event)] = tuple(before), tuple(after)
        else:
            hooks[event] = (*before, *after)
    return hooks


def monitors_of(event: str) -> str:
    """The key, in ``collect_hooks``' result, of the monitoring callbacks of ``event`` that
    run after the module's hook (``on_train_epoch_end``)."""
    return f"{event}:monitors"


#: Events at which monitoring callbacks run after the module's hook (Lightning's order: the
#: module may log there what they judge).
_MONITORS_AFTER_MODULE = frozenset({"on_train_epoch_end"})


def _flag(callback: Callback, name: str) -> bool:
    # Read from the class: an instance attribute of the same name must not change the order.
    return bool(getattr(type(callback), name, False))
