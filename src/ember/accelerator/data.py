"""Data loaders: moving batches to the device and knowing where the epoch stands.

``PreparedDataLoader`` wraps a user's ``DataLoader`` without copying it. It tells the
gradient state how many batches the epoch has (so the last, shorter accumulation window is
normalised by its own size) and marks the last batch. In a run of several processes it
iterates this process's share instead (``ember.accelerator.sharding``), and records where
each batch sits in the epoch (``batch_places``; the padded duplicates that
``gather_for_metrics`` drops).

The settings and the per-batch device transfer live in ``ember.accelerator.transfer``
(``DataLoaderConfiguration`` and ``move_to_device`` are importable from here too).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from ember.accelerator.nested import infer_batch_size as infer_batch_size
from ember.accelerator.nested import slice_tensors
from ember.accelerator.optim import GradientState
from ember.accelerator.passes import (
    ONE_PROCESS,
    PassState,
    SkipLoader,
    capture_pass_rng,
    generator_states,
    has_sampler,
    restore_pass_rng,
    set_generator_states,
)
from ember.accelerator.sharding import BatchPlace, Collectives, IndexSharding
from ember.accelerator.streams import StreamSharding
from ember.accelerator.transfer import DataLoaderConfiguration as DataLoaderConfiguration
from ember.accelerator.transfer import TransferHooks as TransferHooks
from ember.accelerator.transfer import batch_transfer as batch_transfer
from ember.accelerator.transfer import move_to_device as move_to_device
from ember.errors import MisconfigurationError

if TYPE_CHECKING:
    from ember.accelerator.optim import _LoaderFrame
    from ember.accelerator.precision import Precision


class PreparedDataLoader:
    """A data loader whose batches arrive on the device, with the epoch's length known.

    In a run of several processes it is sharded (``sharding``): each process gets its share
    of every epoch, in the global order (see ``ember.accelerator.sharding``).

    Args:
        loader: the user's loader (any iterable of batches; ``DataLoader`` usually).
        gradient_state: told where each epoch begins and when the last batch comes.
        transfer: applied to each batch (device move, dtype cast), or None.
        max_batches: stop the epoch after this many batches (the Trainer's ``limit_*``).
        data_seed: see ``use_seedable_sampler``.
        sharding: this process's share of the loader (``IndexSharding`` or
            ``StreamSharding``); None in one process.
        skip: leave out the first ``skip`` batches of every pass (``skip_first_batches``).
        epochs: the epoch counter to share (a skipping copy shares its loader's, see
            ``skipping``); None: a counter of its own, from epoch 0.
    """

    def __init__(
        self,
        loader: Any,
        gradient_state: GradientState | None = None,
        transfer: Callable[[Any], Any] | None = None,
        max_batches: int | None = None,
        data_seed: int | None = None,
        sharding: IndexSharding | StreamSharding | None = None,
        skip: int = 0,
        epochs: PassState | None = None,
    ) -> None:
        self.loader = loader
        self.gradient_state = gradient_state
        self.transfer = transfer
        self.max_batches = max_batches
        #: With a seed, a shuffling RandomSampler draws each epoch's order from a generator
        #: seeded with ``data_seed + epoch``: the same order in every run and on every rank.
        self.data_seed = data_seed
        self.sharding = sharding
        self.skip = skip
        self._epochs = epochs if epochs is not None else PassState()
        self._places: list[BatchPlace] | None = None
        self._local_plan: IndexSharding | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the next pass; each pass advances it (the Trainer sets it first)."""
        return self._epochs.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epochs.value = value

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    @property
    def batch_size(self) -> int | None:
        return getattr(self.loader, "batch_size", None)

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    @property
    def batch_places(self) -> list[BatchPlace] | None:
        """Where each batch this process yielded in the current (or last) pass sits in the
        epoch's order, in the order yielded; None when the loader is not sharded (one
        process: the batches are the epoch's order itself).

        To return per-batch outputs of every process once, in the order one process would
        produce them (``Trainer.predict``): pair each output with its ``BatchPlace``, gather
        the pairs of every process (``all_gather_object``), then ``assemble_in_order``. A
        ``BatchPlace`` holds ``start`` (position of the first sample in the epoch's order; for
        a sequential sampler, the dataset index), ``size`` (real samples) and ``padding``
        (duplicates after them, from ``even_batches``).
        """
        return None if self._places is None else list(self._places)

    def __len__(self) -> int:
        source = self.sharding if self.sharding is not None else self.loader
        length = max(0, len(source) - self.skip)
        return length if self.max_batches is None else min(length, self.max_batches)

    def known_length(self) -> int | None:
        """The number of batches per epoch, or None for a loader without a length."""
        try:
            return len(self)
        except TypeError:
            return self.max_batches

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch of the next pass (its shuffling order)."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands, for a checkpoint: the epoch of the pass in progress (or
        abandoned before its end), how many batches of it this process consumed (``batches``), the random state it
        began from (``rng``) and, for a map-style loader, the global position in the epoch's
        order (``position``, in ``unit``: what another number of processes resumes from).
        Between passes: the next epoch and 0 batches."""
        counter = self._epochs
        if counter.pending_state is not None:  # restored, and its replay not begun yet
            return dict(counter.pending_state)
        frame = counter.frame
        # The seedable sampler's seed too (without `data_seed` it was drawn at prepare time,
        # from a generator a resumed process seeds differently), and the loader's own
        # generators as they are now (the next epochs draw from them).
        generators = generator_states(self.loader)
        # A pass that ran to its end: the next one is the next epoch. One abandoned on the
        # way (a stop, an exception) is still the pass in progress: it continues there.
        if frame is None or counter.pass_epoch < 0 or (frame.ended and frame.end_of_dataloader):
            return {
                "epoch": counter.value,
                "batches": 0,
                "rng": None,
                "data_seed": self.data_seed,
                "generators": generators,
            }
        state: dict[str, Any] = {
            "epoch": counter.pass_epoch,
            "batches": counter.pass_offset + frame.yielded,
            "rng": counter.pass_rng,
            "data_seed": self.data_seed,
            "generators": generators,
        }
        plan = self._index_plan()
        if plan is not None:
            rounds = counter.pass_skip + frame.yielded
            state["position"] = plan.position_after(rounds, counter.pass_start)
            state["unit"] = plan.position_unit
        return state

    def load_state_dict(
        self, state: dict[str, Any], batches: int | None = None, by_position: bool = False
    ) -> int:
        """Continue from ``state`` (``state_dict``'s): the next pass replays its epoch in the
        same order and leaves out what was consumed. ``batches`` overrides the count of
        batches to leave out (0: replay the whole epoch, for ``skip_first_batches`` to skip).
        ``by_position``: start at the saved global position instead (``state`` written by
        another number of processes: every sample of the epoch still comes exactly once).

        Returns the batch index, in this process's batches, at which the replay begins.
        """
        counter = self._epochs
        plan = self._index_plan() if by_position else None
        if by_position and (
            plan is None or "position" not in state or state.get("unit") != plan.position_unit
        ):
            raise MisconfigurationError(
                "This loader cannot continue mid-epoch on another number of processes: it "
                "needs a DataLoader over a map-style dataset with ember's sharding (no "
                "DistributedSampler of your own), saved the same way."
            )
        counter.value = int(state["epoch"])
        counter.pending_state = dict(state)
        if state.get("data_seed") is not None:
            self.data_seed = int(state["data_seed"])
        replay = {"rng": state.get("rng"), "generators": state.get("generators")}
        if plan is None:
            skip = int(state["batches"]) if batches is None else batches
            counter.replay = {**replay, "skip": skip, "start": 0}
            return skip
        start = int(state["position"])
        counter.replay = {**replay, "skip": 0, "start": start}
        return plan.rounds_before(start)

    def _index_plan(self) -> IndexSharding | None:
        """The index plan of this loader's passes: its sharding, or for a one-process
        map-style loader a one-process plan (built once); None for streams."""
        if isinstance(self.sharding, IndexSharding):
            return self.sharding
        if self.sharding is not None or not has_sampler(self.loader):
            return None
        if isinstance(self.loader.sampler, DistributedSampler):
            return None
        if self._local_plan is None:
            self._local_plan = IndexSharding(self.loader, ONE_PROCESS, False, False)
        return self._local_plan

    def skipping(self, num_batches: int) -> PreparedDataLoader:
        """A copy that leaves out ``num_batches`` more batches of every pass and shares this
        loader's epoch (see ``skip_first_batches``)."""
        return PreparedDataLoader(
            self.loader,
            self.gradient_state,
            self.transfer,
            self.max_batches,
            data_seed=self.data_seed,
            sharding=self.sharding,
            skip=self.skip + num_batches,
            epochs=self._epochs,
        )

    def _begin_pass(self) -> None:
        # Tell the samplers which epoch comes, then count it as started.
        epoch = self.epoch
        self.epoch = epoch + 1
        self._epochs.pass_epoch = epoch
        sampler = self.sampler
        if self.data_seed is not None and isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(self.data_seed + epoch)
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        # The sampler inside a batch sampler too (each object told once).
        holders = {id(item): item for item in (sampler, batch_sampler) if item is not None}
        inner = getattr(batch_sampler, "sampler", None)
        if inner is not None:
            holders.setdefault(id(inner), inner)
        for holder in holders.values():
            set_epoch = getattr(holder, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def _pass_length(self, skip: int, limit: int | None) -> int | None:
        """Batches of a pass of the loader itself that leaves out ``skip`` and yields at most
        ``limit``, when certain (``exact_length``)."""
        if self.exact_length() is None:
            return None
        length = max(0, len(self.loader) - skip)
        return length if limit is None else min(length, limit)

    def exact_length(self) -> int | None:
        """The number of batches a pass yields, when it is certain (None otherwise).

        Certain: a ``DataLoader`` over a map-style dataset, or a list or tuple of batches. An
        ``IterableDataset``'s length is only an estimate, and so may be any other object's.
        """
        loader = self.loader
        certain = isinstance(loader, (list, tuple)) or (
            isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)
        )
        return len(self) if certain else None

    def __iter__(self) -> Iterator[Any]:
        counter = self._epochs
        replay, counter.replay = counter.replay, None
        counter.pending_state = None
        if replay is not None and replay["rng"] is None and replay["generators"] is not None:
            # Saved between passes: the next pass draws from the generators as they were.
            set_generator_states(self.loader, replay["generators"])
        if replay is None or replay["rng"] is None:
            counter.pass_rng = capture_pass_rng(self.loader)
            if replay is None or not (replay["skip"] or replay["start"]):
                return self._open_pass(self.skip, self.max_batches, self.sharding)
        # A resumed pass: the saved epoch, drawn from the random state it began from (the
        # same order, the same worker seeds), without what was already consumed; then the
        # random state of the checkpoint is put back.
        now = capture_pass_rng(self.loader)
        if replay["rng"] is not None:
            counter.pass_rng = replay["rng"]
            restore_pass_rng(self.loader, replay["rng"])
        consumed = int(replay["skip"])
        start = int(replay["start"])
        skip = self.skip + consumed
        try:
            sharding = self.sharding
            if sharding is None and has_sampler(self.loader):
                # The order is drawn now, from the saved random state, and the consumed
                # batches are skipped by index without loading them: the pass goes through
                # a one-process plan of the epoch's order.
                sharding = self._index_plan()
            offset = consumed
            if start:
                assert isinstance(sharding, IndexSharding)
                offset += sharding.rounds_before(start)
            limit = None if self.max_batches is None else max(0, self.max_batches - offset)
            return self._open_pass(skip, limit, sharding, eager=True, start=start)
        finally:
            if now is not None and replay["rng"] is not None:
                # Torch's generator goes back to the checkpoint's state. The loader's own
                # generators stay where drawing the whole order left them: where a pass that
                # runs to its end leaves them (it exhausts the sampler).
                torch.set_rng_state(now["torch"])

    def _open_pass(
        self,
        skip: int,
        limit: int | None,
        sharding: IndexSharding | StreamSharding | None,
        eager: bool = False,
        start: int = 0,
    ) -> Iterator[Any]:
        """Begin a pass that leaves out its first ``skip`` batches (or starts at global
        position ``start``) and then yields at most ``limit``. ``eager``: draw the order
        (and skip by reading, where it must) now, not at the first batch."""
        self._begin_pass()
        state = self.gradient_state if self.gradient_state is not None else _DETACHED
        counter = self._epochs
        offset = skip
        length: int | None
        if sharding is not None:
            # Every rank starts the pass here (rank 0 broadcasts the epoch's order).
            if isinstance(sharding, IndexSharding):
                pairs, length = sharding.open(skip, limit, start)
                offset += sharding.rounds_before(start)
            else:
                pairs, length = sharding.open(skip, limit)
            frame = state.begin_pass(None if length is None else length + offset, source=self)
            batches: Iterator[Any]
            if sharding is self.sharding:
                batches = self._sharded(state, frame, pairs)
            else:  # a one-process replay: batches read when due, as in the pass it replays
                assert length is not None
                batches = self._counted(state, frame, length, (batch for _, batch in pairs))
        else:
            source: Iterable[Any] = self.loader
            if skip:
                source = SkipLoader(self.loader, skip)
                if eager:
                    source = SkipLoader.started(self.loader, skip)
            length = self._pass_length(skip, limit)
            # A pass that reaches the loader's end finishes its iterator, as a plain loop
            # does: a RandomSampler draws once more after its last index, and the next
            # epoch's order depends on that draw.
            finish = length is not None and length == self._pass_length(skip, None)
            # The pass is registered now, not at the first batch: an iterator opened before
            # the training loop (a validation iterator kept open) is older than the training
            # pass, so it never takes over the training loop's accumulation windows.
            frame = state.begin_pass(None if length is None else length + offset, source=self)
            if length is not None:
                batches = self._counted(state, frame, length, source, finish)
            else:
                batches = self._looking_ahead(state, frame, source, limit)
        # The windows of a resumed pass line up with those of the pass it continues.
        frame.batches_seen = offset
        counter.frame = frame
        counter.pass_skip, counter.pass_start, counter.pass_offset = skip, start, offset
        # An iterator dropped before its first batch never runs its `finally`: end its pass
        # when it is collected.
        weakref.finalize(batches, state.end_pass, frame)
        return batches

    def _counted(
        self,
        state: GradientState,
        frame: _LoaderFrame,
        length: int,
        source: Iterable[Any],
        finish: bool = False,
    ) -> Iterator[Any]:
        """Batches of a loader whose length is exact: the last one is known by its index.
        ``finish``: after the last batch, run the loader's iterator to its end."""
        transfer = self.transfer
        try:
            if length == 0:
                return
            iterator = iter(source)
            for index, batch in enumerate(iterator, start=1):
                last = index >= length
                frame.end_of_dataloader = last
                frame.yielded += 1
                if frame.first_yield < 0:
                    frame.mark_first_yield(state)
                state.signal_pending = True  # a new loop iteration begins
                yield batch if transfer is None else transfer(batch)
                if last:
                    if finish:
                        next(iterator, None)
                    return
        finally:
            state.end_pass(frame)

    def _looking_ahead(
        self,
        state: GradientState,
        frame: _LoaderFrame,
        source: Iterable[Any],
        limit: int | None,
    ) -> Iterator[Any]:
        """Batches of a loader of unknown length: reading one batch ahead finds the last."""
        transfer = self.transfer
        try:
            if limit == 0:
                return
            iterator = iter(source)
            try:
                current = next(iterator)
            except StopIteration:
                return
            index = 0
            while True:
                index += 1
                if limit is not None and index >= limit:
                    following, last = None, True
                else:
                    try:
                        following, last = next(iterator), False
                    except StopIteration:
                        following, last = None, True
                frame.end_of_dataloader = last
                frame.yielded += 1
                if frame.first_yield < 0:
                    frame.mark_first_yield(state)
                state.signal_pending = True
                yield current if transfer is None else transfer(current)
                if last:
                    return
                current = following
        finally:
            state.end_pass(frame)

    def _sharded(
        self, state: GradientState, frame: _LoaderFrame, pairs: Iterator[tuple[BatchPlace, Any]]
    ) -> Iterator[Any]:
        """This process's share (``(place, batch)`` pairs), read one ahead to find the last;
        each batch's place is recorded as it is yielded, for ``gather_for_metrics``."""
        transfer = self.transfer
        places: list[BatchPlace] = []
        self._places = places
        state.sharded_passes.append(frame)
        try:
            current = next(pairs, None)
            while current is not None:
                following = next(pairs, None)
                last = following is None
                frame.end_of_dataloader = last
                frame.yielded += 1
                if frame.first_yield < 0:
                    frame.mark_first_yield(state)
                state.signal_pending = True
                place, batch = current
                places.append(place)
                frame.mark_padding(state, place.round_padding)
                yield batch if transfer is None else transfer(batch)
                if last:
                    return
                current = following
        finally:
            state.sharded_passes.remove(frame)
            state.end_pass(frame)


def duplicates_in_last_batch(gradient_state: GradientState) -> int:
    """How many padded duplicates end the batches that the newest sharded pass of
    ``gradient_state`` yielded last, gathered over all processes (0 when none)."""
    newest: _LoaderFrame | None = None
    for frame in gradient_state.sharded_passes:
        if newest is None or frame.padding_mark > newest.padding_mark:
            newest = frame
    return 0 if newest is None or newest.ended else newest.round_padding


def assemble_in_order(places_and_outputs: Iterable[tuple[BatchPlace, Any]]) -> list[Any]:
    """Per-batch outputs of every process (each with its batch's ``BatchPlace``) in the
    epoch's order, each sample once: sorted by place, batches holding only padding dropped,
    padded samples cut off the others' tensors (dim 0)."""
    ordered = sorted(places_and_outputs, key=lambda pair: pair[0].start)
    result = []
    for place, output in ordered:
        if place.size == 0:
            continue
        result.append(slice_tensors(output, 0, place.size) if place.padding else output)
    return result


def prepare_loader(
    loader: Any,
    gradient_state: GradientState,
    device: torch.device | None,
    precision: Precision,
    config: DataLoaderConfiguration,
    max_batches: int | None = None,
    *,
    collectives: Collectives | None = None,
    even_batches: bool | None = None,
    transfer_hooks: TransferHooks | None = None,
) -> PreparedDataLoader:
    """``Accelerator.prepare_data_loader``: ``loader`` wrapped so batches arrive on ``device``
    (None: left where they are) in the precision's input dtype, with epochs tracked.

    With ``collectives`` of more than one process, the loader is sharded (``even_batches``
    None: the configuration's); with one process nothing is rebuilt. ``transfer_hooks``: a
    module's batch-transfer hooks, called on each batch around the device move.
    """
    if isinstance(loader, PreparedDataLoader):
        loader = loader.loader
    convert = precision.convert_input if precision.casts_inputs else None
    transfer = batch_transfer(device, config.non_blocking, convert, transfer_hooks)
    data_seed = None
    if config.use_seedable_sampler:
        # Without data_seed, one draw from torch's generator: seed_everything decides it.
        data_seed = config.data_seed
        if data_seed is None:
            data_seed = int(torch.randint(0, 2**31 - 1, ()).item())
    sharding = None
    if collectives is not None and collectives.world_size > 1:
        if data_seed is not None:
            data_seed = collectives.broadcast_object(data_seed)  # rank 0's, on every rank
        even = config.even_batches if even_batches is None else even_batches
        sharding = shard_loader(loader, collectives, config, even)
    return PreparedDataLoader(
        loader, gradient_state, transfer, max_batches, data_seed=data_seed, sharding=sharding
    )


def shard_loader(
    loader: Any, collectives: Collectives, config: DataLoaderConfiguration, even_batches: bool
) -> IndexSharding | StreamSharding | None:
    """This process's share of ``loader`` (None: the user sharded it already, with a
    ``DistributedSampler``)."""
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        return None
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        return IndexSharding(loader, collectives, config.split_batches, even_batches)
    is_loader = isinstance(loader, DataLoader)
    dispatch = config.dispatch_batches
    return StreamSharding(
        loader,
        collectives,
        config.split_batches,
        even_batches,
        # None: dispatch for iterable datasets; plain iterables of batches are read everywhere.
        dispatch=is_loader if dispatch is None else dispatch,
        batch_size=loader.batch_size if is_loader else None,
        drop_last=bool(loader.drop_last) if is_loader else False,
    )


#: The gradient state of a loader prepared without an accelerator: it only tracks its passes.
_DETACHED = GradientState()


def skip_first_batches(loader: Any, num_batches: int) -> Any:
    """A loader that yields what ``loader`` yields, minus its first ``num_batches`` batches.

    A ``PreparedDataLoader`` gives a copy that shares its epoch (the skipped pass replays
    that epoch's order; the pass after it is the next epoch); a sharded one skips this
    process's batches without loading them.
    """
    if isinstance(loader, PreparedDataLoader):
        return loader.skipping(num_batches)
    return SkipLoader(loader, num_batches)


def is_data_loader(obj: Any) -> bool:
    """Whether ``prepare`` should treat ``obj`` as a data loader."""
    return isinstance(obj, (DataLoader, PreparedDataLoader))
