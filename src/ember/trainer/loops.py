"""The training loop: plain for-loops over batches that fire events by name.

Each loop takes the ``RunContext`` the Trainer built for the run (module, prepared objects,
progress, metrics, hooks) and never the Trainer itself. ``fit`` runs ``train_epoch`` until a
stopping condition; ``train_epoch`` runs each batch (forward, backward, and
``optimizer_step`` at the end of each accumulation window) and ``evaluate`` when validation
is due. ``evaluate`` (validation and test) and ``predict`` are in ``evaluation.py`` (and
importable from here). The order of events is in ``ember/hooks.py`` and ``docs/hooks.md``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ember.checkpoint.rng import restore_rng
from ember.errors import MisconfigurationError
from ember.hooks import monitors_of
from ember.seed import seed_everything
from ember.trainer import preemption
from ember.trainer.evaluation import evaluate, predict
from ember.trainer.profiling import CALLBACKS, DATA, FORWARD, LOOP, OPTIMIZER
from ember.trainer.run_control import may_stop_early

if TYPE_CHECKING:
    from ember.trainer.context import RunContext

__all__ = ["evaluate", "fit", "predict", "train_epoch"]


def fit(context: RunContext) -> None:
    """Train until ``max_epochs``, ``max_steps`` or ``should_stop``."""
    max_time = context.settings.max_time
    if max_time is not None:  # the clock starts with fit
        context.deadline = time.monotonic() + max_time.total_seconds()
    context.profiler.start(context)
    try:
        _fit_started(context)
    finally:  # every exit (an error, limit_train_batches=0): a torch.profiler trace is closed
        context.profiler.stop()


def _fit_started(context: RunContext) -> None:
    profiler = context.profiler
    context.fire("on_fit_start")
    if context.settings.num_sanity_val_steps != 0 and context.validation_enabled:
        context.state.sanity_checking = True
        try:
            evaluate(context, "validation", context.val_loaders, sanity=True)
        finally:
            context.state.sanity_checking = False
    if context.train_loader is not None and context.train_loader.max_batches == 0:
        context.fire("on_fit_end")  # limit_train_batches=0: the sanity check only (Lightning)
        return
    # What on_train_start logs is epoch-level: reduced and sent right after it.
    metrics = context.train_metrics
    metrics.start(on_step=False, on_epoch=True)
    context.fire("on_train_start")
    context.send_to_loggers(metrics.reduce_epoch(context.epoch_sync)[1])
    metrics.close()
    _continue_from_checkpoint(context)
    profiler.enter(LOOP)  # the training window: every moment of it is charged to a part
    while not fit_done(context):
        train_epoch(context)
    profiler.finish(context)
    # The last step's grad-scaler update would otherwise wait for a next backward.
    context.accelerator.end_iteration()
    context.fire("on_train_end")
    context.fire("on_fit_end")


_EPOCH_END_MONITORS = monitors_of("on_train_epoch_end")


def _continue_from_checkpoint(context: RunContext) -> None:
    """Put back what a checkpoint left for the loop: the RNG states of the moment it was
    written (after the sanity check, which must not move them), and the rest of an epoch's
    bookkeeping when it was written at that epoch's end."""
    if context.resume_latest is not None:
        context.train_metrics.load_state_dict({"latest": context.resume_latest})
        context.resume_latest = None
    if context.resume_rng is not None:
        restore_rng(context.resume_rng)
    elif context.resume_seed is not None:  # resumed on more processes than wrote it
        seed_everything(context.resume_seed)
    context.resume_rng = context.resume_seed = None
    if context.pending_epoch_end:
        context.pending_epoch_end = False
        with warnings.catch_warnings():
            # The schedulers step before this process's optimizers have: no reason to warn.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            _finish_epoch(context)


def _finish_epoch(context: RunContext) -> None:
    """The end of an epoch that ran to its last batch: epoch-interval schedulers step (under
    manual optimization the user steps them, Lightning's convention), the next epoch begins."""
    state = context.state
    for config in context.scheduler_configs if context.module.automatic_optimization else ():
        if config.interval == "epoch" and (state.epoch + 1) % config.frequency == 0:
            context.step_scheduler(config)
    state.epoch += 1
    state.batch_idx = 0


def train_epoch(context: RunContext) -> None:
    """One pass over the training loader (or until a stop), then the epoch's bookkeeping.

    The whole batch is written out in this one loop, top to bottom: it runs every step, and
    what is set up once per epoch (the names below) is not looked up again per batch.
    """
    state = context.state
    settings = context.settings
    module = context.module
    model = context.model
    training_step = context.steps.training_step
    accelerator = context.accelerator
    gradient_state = accelerator.gradient_state
    loader = context.train_loader
    assert loader is not None, "fit prepares the training loader before the loop"
    metrics = context.train_metrics
    hooks = context.hooks
    batch_start, batch_end = hooks["on_train_batch_start"], hooks["on_train_batch_end"]
    window_losses = context.window_losses  # (batch_idx, loss) of the open window
    backward = context.backward
    automatic = module.automatic_optimization
    optimizer_steps = accelerator.optimizer_step  # counts the real optimizers' steps
    # Manual optimization steps inside training_step: no autocast cache of weight casts
    # there, or a forward after a step would see the weights from before it.
    autocast = accelerator.autocast if automatic else partial(accelerator.autocast, False)
    validates = context.validation_enabled
    max_steps = settings.max_steps if settings.max_steps != -1 else float("inf")
    stop_vote = context.stop_vote
    timed = context.deadline != math.inf  # max_time: one clock read per step boundary
    monotonic = time.monotonic
    log_every = settings.log_every_n_steps
    switch = context.profiler.switch  # charges the time since its last call, then moves on
    loader.set_epoch(state.epoch)
    metrics.start(on_step=True, on_epoch=False)
    if context.resume_metrics is not None:  # an epoch resumed from a checkpoint
        metrics.load_state_dict(context.resume_metrics)
        context.resume_metrics = None
        # The checkpoint's step values that had not reached the loggers yet: at a flush
        # step they go now, at the checkpoint's step (it was written before that flush),
        # else with the next flush, as in the uninterrupted run.
        if state.global_step % log_every == 0 and state.global_step != state.flushed_step:
            state.flushed_step = state.global_step
            context.send_to_loggers(metrics.pop_step_metrics())
    # No module.train() here: a submodule the user put in eval mode (a frozen backbone's
    # BatchNorm) stays so; evaluate and predict put every submodule's own mode back.
    context.fire("on_train_epoch_start")
    finished = True
    # A resumed epoch starts at the batch after the last one the checkpoint had processed.
    start = state.batch_idx
    batch_idx = start - 1
    if context.resume_batch_end:  # written by on_train_batch_end: the rest of that batch
        context.resume_batch_end = False
        if validates and validation_due(context, batch_idx):
            evaluate(context, "validation", context.val_loaders)
    switch(DATA)
    for batch_idx, batch in enumerate(loader, start):
        switch(LOOP)
        # state.batch_idx already equals batch_idx: it counts the batches processed so far.
        metrics.batch = batch
        for hook in batch_start:
            hook(batch, batch_idx)
        # Forward under autocast, backward (divided by the window's size); distributed
        # backward keeps its gradients local until the window's last batch.
        steps_before = optimizer_steps.steps_taken
        with accelerator.accumulate(model):
            switch(FORWARD)
            with autocast():
                outputs = training_step(batch, batch_idx)
            switch(LOOP)
            if automatic:
                loss: Tensor | None
                if type(outputs) is Tensor and outputs.requires_grad and outputs.numel() == 1:
                    loss, num_items = outputs, None  # the common case, checked in one line
                else:
                    loss, num_items = _loss_of(outputs, batch_idx)
                if loss is not None:
                    # Not detached (one op less per batch): backward frees the graph's
                    # buffers, and the list is cleared when the window closes.
                    window_losses.append((batch_idx, loss))
                    backward(loss, num_items)
        if gradient_state.sync_gradients:
            state.accumulation_position = 0
            if automatic:
                switch(OPTIMIZER)
                optimizer_step(context)
                switch(LOOP)
            elif optimizer_steps.steps_taken != steps_before:
                # Manual optimization: one step per batch in which any optimizer stepped,
                # however many did (Lightning counts each optimizer's step).
                state.global_step += 1
        else:
            state.accumulation_position += 1
        state.batch_idx = batch_idx + 1
        state.total_batch_idx += 1
        context.in_batch_end = True
        for hook in batch_end:
            hook(outputs, batch, batch_idx)
        context.in_batch_end = False
        # After on_train_batch_end, so what it logs goes out with the step it measured.
        if state.global_step % log_every == 0 and state.global_step != state.flushed_step:
            state.flushed_step = state.global_step
            switch(CALLBACKS)
            context.send_to_loggers(metrics.pop_step_metrics())
            switch(LOOP)
        if validates and validation_due(context, batch_idx):
            evaluate(context, "validation", context.val_loaders)
        # Stop only between windows, so no half-accumulated gradient is left behind. Every
        # process stops at the same step: a stop asked on one is agreed on one step later,
        # without a blocking collective per step (one process: at once).
        if state.accumulation_position == 0:
            # preemption.vote, written out: this runs every step.
            if timed and monotonic() >= context.deadline:  # max_time
                context.should_stop = True
            agreed = stop_vote.exchange(
                preemption.PREEMPT if context.preempted else context.should_stop
            )
            if agreed or state.global_step >= max_steps:
                preemption.act_on(context, agreed)
                # A stop asked before min_epochs / min_steps waits (decided from the loop
                # progress, the same on every process); max_steps does not.
                if state.global_step >= max_steps or may_stop_early(context):
                    finished = batch_idx + 1 == context.num_training_batches
                    break
        switch(DATA)  # the step is over: waiting for the next batch begins
    switch(LOOP)
    preemption.act_on(context, stop_vote.settle())  # a stop voted at the epoch's last step
    if state.accumulation_position != 0:
        # The loader ended before the length it announced: close the open window (its
        # gradient is rescaled to the batches it really holds) rather than carry it over.
        gradient_state.sync_gradients = True
        state.accumulation_position = 0
        if automatic:
            switch(OPTIMIZER)
            optimizer_step(context)
            switch(LOOP)
    if batch_idx < 0:
        raise MisconfigurationError(
            "The training loader produced no batch. Check that its dataset is not empty and "
            "that `limit_train_batches` leaves at least one batch."
        )
    metrics.default_on_step, metrics.default_on_epoch = False, True
    metrics.batch = None  # what the epoch-end hooks log is not from a batch
    # Epoch values of what the batches logged are ready for on_train_epoch_end; what the
    # epoch-end hooks log themselves is reduced just after them.
    _, for_loggers = metrics.reduce_epoch(context.epoch_sync)
    # A checkpoint written by the epoch-end hooks of a finished epoch resumes with the next.
    context.epoch_finished = finished
    try:
        context.fire("on_train_epoch_end")
        # What the module and the other callbacks logged there is reduced before the
        # monitoring callbacks (EarlyStopping, ModelCheckpoint) judge it.
        _, more_for_loggers = metrics.reduce_epoch(context.epoch_sync)
        monitors = hooks[_EPOCH_END_MONITORS]
        for hook in monitors:
            hook()
        if monitors:
            more_for_loggers.update(metrics.reduce_epoch(context.epoch_sync)[1])
    finally:
        context.epoch_finished = False
    # Step values not flushed yet wait for the next log_every_n_steps flush (as in Lightning).
    context.send_to_loggers({**for_loggers, **more_for_loggers})
    metrics.close()
    if finished:
        _finish_epoch(context)
    switch(CALLBACKS)
    for logger in context.loggers if context.is_global_zero else ():
        logger.save()
    switch(LOOP)


def validation_due(context: RunContext, batch_idx: int) -> bool:
    """Whether validation runs after training batch ``batch_idx`` (val_check_interval and
    check_val_every_n_epoch); the caller checked ``context.validation_enabled``."""
    settings = context.settings
    interval = settings.val_check_interval
    if settings.check_val_every_n_epoch is None:
        return context.state.total_batch_idx % int(interval) == 0
    if (context.state.epoch + 1) % settings.check_val_every_n_epoch != 0:
        return False
    done = batch_idx + 1
    total = context.num_training_batches
    if isinstance(interval, float):
        if total is None:
            return context.accelerator.gradient_state.end_of_dataloader
        every = max(1, int(total * interval))
        return done % every == 0 or (interval == 1.0 and done == total)
    return done % interval == 0


def should_stop_now(context: RunContext) -> bool:
    if context.should_stop and may_stop_early(context):
        return True
    max_steps = context.settings.max_steps
    return max_steps != -1 and context.state.global_step >= max_steps


def fit_done(context: RunContext) -> bool:
    """Whether fit should not start another epoch (agreed by every process)."""
    preemption.act_on(context, context.stop_vote.now(preemption.vote(context)))
    if should_stop_now(context):
        return True
    max_epochs = context.settings.max_epochs
    return max_epochs != -1 and context.state.epoch >= max_epochs


def _loss_of(outputs: Any, batch_idx: int) -> tuple[Tensor | None, Any]:
    """The loss and item count in what ``training_step`` returned, checked."""
    if outputs is None:
        return None, None
    num_items = None
    loss = outputs
    if isinstance(outputs, Mapping):
        if "loss" not in outputs:
            raise MisconfigurationError(
                f"training_step returned a dict without a 'loss' key (keys: {sorted(outputs)}) "
                f"at batch {batch_idx}. Put the loss tensor under 'loss', or return None to "
                "skip the batch."
            )
        loss = outputs["loss"]
        num_items = outputs.get("num_items")
    if not isinstance(loss, Tensor):
        raise MisconfigurationError(
            f"training_step returned a loss of type {type(loss).__name__} at batch {batch_idx}; "
            "it must be a scalar tensor, a dict with 'loss', or None."
        )
    if loss.numel() != 1:
        raise MisconfigurationError(
            f"training_step returned a non-scalar loss of shape {tuple(loss.shape)} at batch "
            f"{batch_idx}; reduce it to one value (e.g. .mean() or .sum())."
        )
    if not loss.requires_grad:
        raise MisconfigurationError(
            f"The loss returned by training_step at batch {batch_idx} has no gradient "
            "(requires_grad=False): it was detached, computed under torch.no_grad(), or does "
            "not depend on any trainable parameter."
        )
    return loss, num_items


def optimizer_step(context: RunContext) -> None:
    """Close the accumulation window: check the losses, unscale, clip, step, zero.

    Automatic optimization drives one optimizer, ``context.optimizers[0]``.
    """
    state = context.state
    losses = context.window_losses
    if not losses:  # every batch of the window returned None: nothing to apply
        return
    optimizer = context.optimizers[0]
    # One host sync per optimizer step, none per batch.
    finite = math.isfinite(losses[0][1].item()) if len(losses) == 1 else _all_finite(losses)
    if not finite:
        _nonfinite_loss(context, losses)
        losses.clear()
        return
    losses.clear()
    hooks = context.hooks
    before_step = hooks["on_before_optimizer_step"]
    if before_step:  # they must see the unscaled gradient; step() unscales otherwise
        context.accelerator.unscale_gradients()
        for hook in before_step:
            hook(optimizer)
    # An `if`, not a no-op call: measured per step. Clipping reads the optimizer's
    # param_groups now, so what was unfrozen or added since fit started is clipped too.
    settings = context.settings
    if settings.gradient_clip_val is not None:
        context.clip_gradients(
            context.optimizers, settings.gradient_clip_val, settings.gradient_clip_algorithm
        )
    # What optimizer.step() runs at a window's end (it only checks that the window is
    # closed, which it is here), without that layer: this runs every step.
    context.accelerator.optimizer_step.step(optimizer, None, {})
    for hook in hooks["on_before_zero_grad"]:
        hook(optimizer)
    optimizer.optimizer.zero_grad(set_to_none=True)  # the window's end: the real one directly
    state.global_step += 1
    for config in context.scheduler_configs:
        if config.interval == "step" and state.global_step % config.frequency == 0:
            context.step_scheduler(config)


def _all_finite(losses: list[tuple[int, Tensor]]) -> bool:
    stacked = torch.stack([loss.detach().float().reshape(()) for _, loss in losses])
    return bool(stacked.isfinite().all())


def _nonfinite_loss(context: RunContext, losses: list[tuple[int, Tensor]]) -> None:
    state = context.state
    batch_idx, loss = next((i, loss) for i, loss in losses if not math.isfinite(loss.item()))
    if context.settings.on_nonfinite_loss == "raise":
        raise FloatingPointError(
            f"The loss is {loss.item()} at global step {state.global_step} (epoch {state.epoch}, "
            f"batch index {batch_idx}). Lower the learning rate, clip gradients, check the inputs "
            "of that batch, or pass Trainer(on_nonfinite_loss='skip') to drop such updates."
        )
    # "skip": drop the whole window's update; the gradient holds NaN/inf, so clear it.
    for optimizer in context.optimizers:
        optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += 1
    context.train_metrics.set_latest("skipped_steps", float(state.skipped_steps))
    context.send_to_loggers({"skipped_steps": float(state.skipped_steps)})
