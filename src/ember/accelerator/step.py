"""The optimizer step, in one place: what happens to a gradient between ``backward`` and the
real optimizer's ``step``.

Read top to bottom, a gradient's life::

    backward(loss)    a new gradient where a new iteration began (the pending scaler update);
                      the loss divided by the window's size, or its items counted; scaled
    prepare()         once per optimizer and gradient, at clip_grad_* or step():
                      unscale (fp16: divide by the loss scale), normalise (num_items, or a
                      window cut short)
    clip_grad_*()     the optimizers that hold the clipped parameters are prepared first
    step()            step(closure, **kwargs) on the real optimizer; fp16 may skip it

and once per loop iteration, just before the first ``backward`` of the next one, the grad
scaler's ``update`` (as in PyTorch's AMP recipe for several optimizers: one scaler, one update
per iteration, however many optimizers stepped).

Where iterations end: a prepared loader drew a batch, or ``accumulate()`` was entered. A loop
that uses neither gets a new iteration at each ``backward`` after the gradient was used.
Every mark of "already unscaled" belongs to one gradient *generation*: a new generation starts
with the update, so nothing outlives the gradient it described (a loop that clips and then
skips ``step`` leaves nothing behind).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ember.accelerator.optim import AcceleratedOptimizer, GradientState, scale_gradients
from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.accelerator.precision import Precision
    from ember.accelerator.strategies import Strategy


class OptimizerStep:
    """Unscales, normalises and steps prepared optimizers; updates the grad scaler.

    Args:
        gradient_state: the windows and iterations of the accelerator.
        precision: unscales, steps (and may skip) and updates the loss scale.
        strategy: sums the item count over processes.
    """

    def __init__(
        self,
        gradient_state: GradientState,
        precision: Precision,
        strategy: Strategy,
        optimizers: list[AcceleratedOptimizer],
    ) -> None:
        self.gradient_state = gradient_state
        self.precision = precision
        self.strategy = strategy
        #: The accelerator's prepared optimizers (the same list, kept up to date by it).
        self.optimizers = optimizers
        #: Calls of a prepared optimizer's ``step`` at a window's end, skipped fp16 steps
        #: included (the Trainer counts manual optimization's steps with it).
        self.steps_taken = 0
        #: Apply the scaler update right after a step when no other optimizer holds a
        #: gradient still to be stepped (Lightning's manual optimization: an optimizer may
        #: step several times per batch, a WGAN critic say). False: once per iteration.
        self.update_after_step = False

    # --- a gradient begins -------------------------------------------------------------------
    def backward(
        self, loss: Tensor, num_items: Tensor | int | None, kwargs: dict[str, Any]
    ) -> None:
        """``Accelerator.backward``: a new gradient where a new iteration began, the item count
        or the window's division, then the (scaled) backward."""
        state = self.gradient_state
        # A new gradient begins where a new iteration began after the last one was used (or,
        # in a loop that marks no iterations, at any backward after it was used).
        if state.consumed and (state.signal_pending or not state.generation_signalled):
            self.end_iteration()
        if state.signal_pending:
            state.generation_signalled = True
            state.signal_pending = False
        if num_items is not None:
            state.add_items(num_items)
        elif state.window_size > 1:
            loss = loss / state.window_size
        if self.precision.scales_gradients:
            self.precision.backward(loss, **kwargs)
        else:
            loss.backward(**kwargs)

    def end_iteration(self) -> None:
        """Close the gradient that was used: apply the pending scaler update, and start a new
        generation (no optimizer counts as unscaled, the item count restarts)."""
        state = self.gradient_state
        if not state.consumed:
            return
        if self.precision.scales_gradients:
            self.precision.update()
        for optimizer in self.optimizers:  # a flag describes the gradient it was set on
            optimizer.step_was_skipped = False
        state.generation += 1
        state.consumed = False
        state.generation_signalled = False
        state.item_total = None

    # --- the step ----------------------------------------------------------------------------
    def prepare(self, optimizer: AcceleratedOptimizer) -> None:
        """Unscale (fp16) and normalise ``optimizer``'s gradient: once per gradient."""
        state = self.gradient_state
        if optimizer.prepared_generation == state.generation:
            if optimizer.stepped_generation == state.generation:
                self._refuse_second_step(optimizer)
            return
        optimizer.prepared_generation = state.generation
        state.consumed = True
        precision = self.precision
        if precision.scales_gradients:
            precision.unscale(optimizer.optimizer)
        if state.item_total is None and state.window_batches >= state.window_size:
            return  # a whole window of mean losses: already normalised (needs_normalising)
        factor = self._gradient_factor()
        if factor is not None:
            scale_gradients(optimizer.optimizer, factor)

    def unscale(self, optimizer: Optimizer | None = None) -> None:
        """Prepare ``optimizer`` (a prepared one or its real optimizer), or every one."""
        chosen = [
            wrapped
            for wrapped in self.optimizers
            if optimizer is None or optimizer is wrapped or optimizer is wrapped.optimizer
        ]
        if optimizer is not None and not chosen:
            raise MisconfigurationError(
                f"unscale_gradients got a {type(optimizer).__name__} that this accelerator did "
                "not prepare; pass one returned by accelerator.prepare (or its optimizer), or "
                "nothing to unscale every prepared optimizer."
            )
        for wrapped in chosen:
            self.prepare(wrapped)

    def clip_grad_norm_(
        self, parameters: Iterable[Tensor] | Tensor, max_norm: float, norm_type: float
    ) -> Tensor:
        """Unscale the optimizers of ``parameters`` (at a window's end), then clip the total
        norm; return the norm before clipping."""
        parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        if self.gradient_state.sync_gradients:
            self._unscale_owners(parameters)
        return self.strategy.clip_grad_norm_(parameters, max_norm, norm_type)

    def clip_grad_value_(self, parameters: Iterable[Tensor] | Tensor, clip_value: float) -> None:
        """Unscale the optimizers of ``parameters`` (at a window's end), then clamp."""
        parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        if self.gradient_state.sync_gradients:
            self._unscale_owners(parameters)
        self.strategy.clip_grad_value_(parameters, clip_value)

    def _unscale_owners(self, parameters: list[Tensor]) -> None:
        # Only the optimizers that update these parameters: in a GAN loop the generator's
        # optimizer must not be unscaled while the discriminator is clipped (its gradient of
        # this iteration does not exist yet).
        if len(self.optimizers) == 1:
            self.prepare(self.optimizers[0])
            return
        wanted = {id(parameter) for parameter in parameters}
        for wrapped in self.optimizers:
            if any(
                id(parameter) in wanted
                for group in wrapped.param_groups
                for parameter in group["params"]
            ):
                self.prepare(wrapped)

    def step(self, optimizer: AcceleratedOptimizer, closure: Any, kwargs: dict[str, Any]) -> Any:
        """Prepare the gradient, then step the real optimizer (closure and keyword arguments
        as given); record whether it really stepped."""
        state = self.gradient_state
        if closure is not None and (self.precision.scales_gradients or state.needs_normalising()):
            self._check_closure(optimizer)
        self.prepare(optimizer)
        self.steps_taken += 1
        optimizer.stepped_generation = state.generation
        precision = self.precision
        if not precision.scales_gradients:
            # Nothing can skip the step: the real optimizer directly (what the base
            # Precision.optimizer_step does; one call less per step, as in ``backward``).
            real = optimizer.optimizer
            return real.step(**kwargs) if closure is None else real.step(closure, **kwargs)
        optimizer.real_step_ran = False
        result = precision.optimizer_step(optimizer.optimizer, closure, kwargs)
        skipped = not optimizer.real_step_ran
        if self.update_after_step and not self._others_hold_gradients(optimizer):
            self.end_iteration()
        optimizer.step_was_skipped = skipped
        return result

    def _others_hold_gradients(self, optimizer: AcceleratedOptimizer) -> bool:
        # A gradient produced under the current scale and not stepped yet must be unscaled
        # with that scale: the update waits for it.
        generation = self.gradient_state.generation
        return any(
            other is not optimizer
            and other.stepped_generation != generation
            and any(p.grad is not None for group in other.param_groups for p in group["params"])
            for other in self.optimizers
        )

    def _gradient_factor(self) -> Tensor | float | None:
        state = self.gradient_state
        if state.item_total is not None:
            total = state.item_total
            processes = self.strategy.world_size
            if processes > 1:
                total = self.strategy.all_reduce(
                    torch.as_tensor(total, device=self.strategy.device), "sum"
                )
            # Distributed backward averages over processes; the items want a sum over all.
            if isinstance(total, Tensor):
                return processes / total.clamp(min=1)
            return processes / max(total, 1)
        correction = state.window_correction()
        return None if correction == 1.0 else correction

    def _refuse_second_step(self, optimizer: AcceleratedOptimizer) -> None:
        # The optimizer stepped on this gradient and is asked to unscale or step again, with
        # no new iteration seen in between. With nothing to unscale or normalise that is
        # harmless; otherwise the new gradient would go out scaled or unnormalised.
        if not (self.precision.scales_gradients or self.gradient_state.needs_normalising()):
            return
        raise RuntimeError(
            f"The prepared {type(optimizer.optimizer).__name__} already stepped on this "
            "gradient and is asked to unscale or step "
            "again, but no new loop iteration began in between, so the new gradient cannot be "
            "unscaled/normalised exactly once. Enter `with accelerator.accumulate(model):` at "
            "the start of each iteration (or draw the training batches from a prepared loader) "
            "so ember knows where iterations end."
        )

    def _check_closure(self, optimizer: AcceleratedOptimizer) -> None:
        if self.precision.scales_gradients:
            return  # GradScaler.step raises its own error for closures, as in plain torch
        raise MisconfigurationError(
            f"{type(optimizer.optimizer).__name__}.step(closure) with a gradient that must be normalised (num_items, "
            "or an accumulation window cut short): the closure would recompute a gradient "
            "that is not normalised. Use a closure without num_items and without "
            "accumulation, or step without a closure."
        )
