"""Sharded loaders, tested in one process: each rank of N is played in turn, rank 0 with
recorded broadcasts that the other ranks replay (the same collectives in the same order).
Every test compares against plain PyTorch: one process with batch N x B."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from ember import Accelerator, DataLoaderConfiguration, MisconfigurationError
from ember.accelerator.data import (
    PreparedDataLoader,
    assemble_in_order,
    duplicates_in_last_batch,
    prepare_loader,
    skip_first_batches,
)
from ember.accelerator.sharding import BatchPlace, plan_split, plan_whole

WORLD = 2


class Recorder:
    """Rank 0: broadcasts return their input and are recorded for the other ranks."""

    def __init__(self, world_size: int) -> None:
        self.rank = 0
        self.world_size = world_size
        self.log: list[Any] = []

    def broadcast_tensor(self, tensor: Tensor) -> Tensor:
        self.log.append(tensor.clone())
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        self.log.append(copy.deepcopy(obj))
        return obj

    def all_gather(self, tensor: Tensor) -> Tensor:
        return torch.cat([tensor] * self.world_size)


class Replayer(Recorder):
    """Rank r > 0: broadcasts return what rank 0 sent, in order."""

    def __init__(self, rank: int, world_size: int, log: list[Any]) -> None:
        super().__init__(world_size)
        self.rank = rank
        self._sent = iter(log)

    def broadcast_tensor(self, tensor: Tensor) -> Tensor:
        sent = next(self._sent)
        assert sent.shape == tensor.shape and sent.dtype == tensor.dtype
        return sent

    def broadcast_object(self, obj: Any) -> Any:
        return next(self._sent)


def indices(count: int) -> TensorDataset:
    """A dataset whose sample i is the number i (so batches show the order)."""
    return TensorDataset(torch.arange(count))


def flat(batch: Any) -> list[int]:
    tensor = batch[0] if isinstance(batch, (list, tuple)) else batch
    return [int(value) for value in tensor.reshape(-1).tolist()]


def prepare(
    loader: Any, collectives: Any, config: DataLoaderConfiguration | None = None, **kwargs: Any
) -> PreparedDataLoader:
    accelerator = Accelerator(cpu=True)
    return prepare_loader(
        loader,
        accelerator.gradient_state,
        None,
        accelerator.precision,
        config or DataLoaderConfiguration(),
        collectives=collectives,
        **kwargs,
    )


def run_ranks(
    make_loader: Callable[[], Any],
    world: int = WORLD,
    epochs: int = 1,
    config: DataLoaderConfiguration | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> list[list[list[Any]]]:
    """Per rank, per epoch, the batches it yields (rank 0 first, with the global RNG seeded
    with ``seed`` just before its loader is made, as a one-process reference would be)."""
    recorder = Recorder(world)
    if seed is not None:
        torch.manual_seed(seed)
    first = prepare(make_loader(), recorder, config, **kwargs)
    results = [[list(first) for _ in range(epochs)]]
    for rank in range(1, world):
        prepared = prepare(make_loader(), Replayer(rank, world, recorder.log), config, **kwargs)
        results.append([list(prepared) for _ in range(epochs)])
    return results


def rounds(per_rank: list[list[Any]]) -> list[list[int]]:
    """The batches of every rank at each step, concatenated in rank order (what a gather
    gives); steps where only some ranks have a batch concatenate those."""
    steps = max(len(batches) for batches in per_rank)
    return [
        [value for batches in per_rank if step < len(batches) for value in flat(batches[step])]
        for step in range(steps)
    ]


# --- the global order ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [82, 99, 512, 16, 3])
@pytest.mark.parametrize("even", [True, False])
def test_sequential_sharding_reconstructs_the_big_batch_order(size: int, even: bool) -> None:
    batch = 8
    config = DataLoaderConfiguration(even_batches=even)
    ranks = run_ranks(lambda: DataLoader(indices(size), batch_size=batch), config=config)
    reference = [flat(b) for b in DataLoader(indices(size), batch_size=WORLD * batch)]
    got = rounds([epochs[0] for epochs in ranks])
    assert len(got) == len(reference)
    full = size // (WORLD * batch)
    assert got[:full] == reference[:full]  # every full round is the big batch
    if even:
        assert all(len(epochs[0]) == len(ranks[0][0]) for epochs in ranks)
        assert all(len(flat(b)) == batch for epochs in ranks for b in epochs[0])
        if len(got) > full:  # the last round: the real samples, then the epoch's start again
            real = reference[-1]
            padding = got[-1][len(real) :]
            assert got[-1][: len(real)] == real
            assert padding == (list(range(size)) * WORLD * batch)[: len(padding)]
    else:
        assert got == reference  # nothing repeated
    for rank, epochs in enumerate(ranks):
        loader = prepare(
            DataLoader(indices(size), batch_size=batch),
            Replayer(rank, WORLD, []),
            config,
        )
        assert len(loader) == len(epochs[0])  # known before any pass


@pytest.mark.parametrize("size", [82, 99, 512])
@pytest.mark.parametrize("even", [True, False])
def test_batch_places_trim_to_each_sample_once(size: int, even: bool) -> None:
    recorder = Recorder(WORLD)
    loaders = [
        prepare(
            DataLoader(indices(size), batch_size=8),
            recorder,
            DataLoaderConfiguration(even_batches=even),
        )
    ]
    pairs = []
    for batch in loaders[0]:
        pairs.append((loaders[0].batch_places[len(pairs)], batch))  # type: ignore[index]
    replayed = prepare(
        DataLoader(indices(size), batch_size=8),
        Replayer(1, WORLD, recorder.log),
        DataLoaderConfiguration(even_batches=even),
    )
    outputs = list(replayed)
    pairs += list(zip(replayed.batch_places or [], outputs, strict=True))
    ordered = assemble_in_order(pairs)
    assert [value for batch in ordered for value in flat(batch)] == list(range(size))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("epochs", [2])
def test_shuffled_order_is_the_one_process_order(split: bool, epochs: int) -> None:
    batch = 8 if split else 4  # the global batch is 8 either way
    config = DataLoaderConfiguration(split_batches=split)
    ranks = run_ranks(
        lambda: DataLoader(indices(50), batch_size=batch, shuffle=True),
        epochs=epochs,
        config=config,
        seed=7,
    )
    torch.manual_seed(7)
    reference_loader = DataLoader(indices(50), batch_size=8, shuffle=True)
    for epoch in range(epochs):
        reference = [flat(b) for b in reference_loader]
        got = rounds([per_rank[epoch] for per_rank in ranks])
        assert got[:-1] == reference[:-1]
        assert got[-1][: len(reference[-1])] == reference[-1]
    assert flat(ranks[0][0][0]) != flat(ranks[0][1][0])  # a new order each epoch


def test_shuffled_with_a_generator_and_drop_last() -> None:
    def make() -> DataLoader:
        generator = torch.Generator().manual_seed(3)
        return DataLoader(
            indices(45), batch_size=5, shuffle=True, generator=generator, drop_last=True
        )

    ranks = run_ranks(make, epochs=2)
    reference_loader = DataLoader(
        indices(45),
        batch_size=10,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
        drop_last=True,
    )
    for epoch in range(2):
        assert rounds([r[epoch] for r in ranks]) == [flat(b) for b in reference_loader]
    assert len(ranks[0][0]) == 4  # drop_last drops the short global batch (45 = 4 x 10 + 5)


class EveryThird(Sampler[int]):
    """A custom sampler with set_epoch: the epoch's order depends on the epoch."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epoch = 0
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs.append(epoch)

    def __iter__(self) -> Iterator[int]:
        shift = self.epoch % self.size
        return iter([(index * 3 + shift) % self.size for index in range(self.size)])

    def __len__(self) -> int:
        return self.size


@pytest.mark.parametrize(
    "make_sampler",
    [
        lambda: SequentialSampler(range(30)),
        lambda: WeightedRandomSampler(torch.linspace(0.1, 1.0, 30), num_samples=40),
        lambda: RandomSampler(range(30), replacement=True, num_samples=33),
        lambda: EveryThird(30),
    ],
    ids=["sequential", "weighted", "replacement", "custom"],
)
def test_any_sampler_keeps_its_order(make_sampler: Callable[[], Sampler[int]]) -> None:
    def make() -> DataLoader:
        return DataLoader(indices(30), batch_size=3, sampler=make_sampler())

    ranks = run_ranks(make, epochs=2, seed=11, config=DataLoaderConfiguration(even_batches=False))
    torch.manual_seed(11)
    reference_loader = DataLoader(indices(30), batch_size=6, sampler=make_sampler())
    for epoch in range(2):
        reference_loader.sampler.set_epoch(epoch) if hasattr(
            reference_loader.sampler, "set_epoch"
        ) else None  # type: ignore[union-attr]
        assert rounds([r[epoch] for r in ranks]) == [flat(b) for b in reference_loader]


def test_set_epoch_reaches_the_sampler_that_rank_zero_iterates() -> None:
    sampler = EveryThird(12)
    prepared = prepare(DataLoader(indices(12), batch_size=2, sampler=sampler), Recorder(WORLD))
    prepared.set_epoch(4)
    first = [flat(b) for b in prepared]
    assert sampler.epochs == [4]
    assert first[0] == [4, 7]  # rank 0's slice of the epoch-4 order 4, 7, 10, 1, ...


def test_batch_sampler_whole_batches_round_robin() -> None:
    batches = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [10, 11]]

    def make() -> DataLoader:
        return DataLoader(indices(12), batch_sampler=batches)

    uneven = run_ranks(make, config=DataLoaderConfiguration(even_batches=False))
    assert [flat(b) for b in uneven[0][0]] == [[0, 1, 2], [5, 6, 7, 8], [10, 11]]
    assert [flat(b) for b in uneven[1][0]] == [[3, 4], [9]]
    even = run_ranks(make)
    assert [flat(b) for b in even[1][0]] == [[3, 4], [9], [0, 1, 2]]  # the start again
    assert plan_whole(batches, 1, 2, True)[-1].place == BatchPlace(12, 0, 3, 3)


def test_batch_sampler_split_batches() -> None:
    sampler = BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False)
    ranks = run_ranks(
        lambda: DataLoader(indices(10), batch_sampler=sampler),
        config=DataLoaderConfiguration(split_batches=True),
    )
    assert [flat(b) for b in ranks[0][0]] == [[0, 1], [4, 5], [8, 9]]
    assert [flat(b) for b in ranks[1][0]] == [[2, 3], [6, 7], [0, 1]]


def test_split_batches_needs_a_divisible_batch_size() -> None:
    with pytest.raises(MisconfigurationError, match=r"batch_size \(5\) over 2 processes"):
        prepare(
            DataLoader(indices(10), batch_size=5),
            Recorder(WORLD),
            DataLoaderConfiguration(split_batches=True),
        )


def test_no_automatic_batching_shards_samples() -> None:
    ranks = run_ranks(lambda: DataLoader(indices(5), batch_size=None))
    assert [flat(sample) for sample in ranks[0][0]] == [[0], [2], [4]]
    assert [flat(sample) for sample in ranks[1][0]] == [[1], [3], [0]]


def test_seedable_sampler_draws_from_data_seed_and_epoch() -> None:
    config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=5)
    ranks = run_ranks(
        lambda: DataLoader(indices(12), batch_size=3, shuffle=True), epochs=2, config=config, seed=1
    )
    for epoch in range(2):
        expected = torch.randperm(12, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert [value for step in rounds([r[epoch] for r in ranks]) for value in step] == expected


def test_the_rank_loader_keeps_the_users_options() -> None:
    def collate(samples: list[Any]) -> Tensor:
        return torch.stack([sample[0] for sample in samples]) * 10

    def init(worker: int) -> None:
        pass

    generator = torch.Generator()
    loader = DataLoader(
        indices(8),
        batch_size=2,
        collate_fn=collate,
        num_workers=1,
        pin_memory=True,
        worker_init_fn=init,
        generator=generator,
        persistent_workers=True,
        prefetch_factor=3,
    )
    prepared = prepare(loader, Recorder(WORLD))
    rank_loader = prepared.sharding.rank_loader  # type: ignore[union-attr]
    assert rank_loader.collate_fn is collate
    assert rank_loader.num_workers == 1
    assert rank_loader.pin_memory is True
    assert rank_loader.worker_init_fn is init
    assert rank_loader.generator is generator
    assert rank_loader.persistent_workers is True
    assert rank_loader.prefetch_factor == 3
    one_worker = DataLoader(indices(8), batch_size=2, collate_fn=collate)
    got = [flat(b) for b in prepare(one_worker, Recorder(WORLD))]
    assert got == [[0, 10], [40, 50]]


def test_one_process_is_not_rebuilt() -> None:
    loader = DataLoader(indices(8), batch_size=2)
    prepared = Accelerator(cpu=True).prepare(loader)
    assert prepared.sharding is None and prepared.batch_places is None
    assert prepared.loader is loader


# --- skipping ------------------------------------------------------------------------------


def test_skip_counts_this_ranks_batches_and_keeps_the_epochs_order() -> None:
    def make() -> DataLoader:
        return DataLoader(indices(40), batch_size=4, shuffle=True)

    torch.manual_seed(5)
    full = prepare(make(), Recorder(WORLD))
    full.set_epoch(3)
    torch.manual_seed(9)
    whole_epoch = [flat(b) for b in full]
    torch.manual_seed(5)
    resumed = prepare(
        make(), Recorder(WORLD), DataLoaderConfiguration(use_seedable_sampler=True, data_seed=2)
    )
    resumed.set_epoch(3)
    skipped = skip_first_batches(resumed, 2)
    assert len(skipped) == len(resumed) - 2
    rest = [flat(b) for b in skipped]
    resumed_again = prepare(
        make(), Recorder(WORLD), DataLoaderConfiguration(use_seedable_sampler=True, data_seed=2)
    )
    resumed_again.set_epoch(3)
    assert rest == [flat(b) for b in resumed_again][2:]  # the same epoch's order (epoch 3)
    assert resumed.epoch == 4  # the skipped pass was epoch 3; the next one is 4
    assert len(whole_epoch) == 5


def test_skip_on_an_unsharded_loader_keeps_the_epoch() -> None:
    config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=1)
    accelerator = Accelerator(cpu=True, dataloader_config=config)
    loader = accelerator.prepare(DataLoader(indices(12), batch_size=3, shuffle=True))
    loader.set_epoch(2)
    expected = [flat(b) for b in loader][1:]
    loader.set_epoch(2)
    skipped = accelerator.skip_first_batches(loader, 1)
    assert [flat(b) for b in skipped] == expected
    assert loader.epoch == 3


# --- gradient state and padding records ------------------------------------------------------


def test_sharded_pass_marks_its_last_batch_and_duplicates() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    prepared = prepare_loader(
        DataLoader(indices(20), batch_size=4),
        accelerator.gradient_state,
        None,
        accelerator.precision,
        DataLoaderConfiguration(),
        collectives=Recorder(WORLD),
    )
    flags, duplicates = [], []
    for _ in prepared:
        with accelerator.accumulate():
            flags.append(accelerator.sync_gradients)
        duplicates.append(duplicates_in_last_batch(accelerator.gradient_state))
    assert flags == [False, True, True]  # 3 batches: the last, alone, closes its window
    assert duplicates == [0, 0, 4]  # the last round: 4 real samples, 4 from the start
    assert duplicates_in_last_batch(accelerator.gradient_state) == 0  # the pass is over


def test_evaluation_override_turns_padding_off() -> None:
    prepared = prepare(
        DataLoader(indices(20), batch_size=4), Replayer(1, WORLD, []), even_batches=False
    )
    assert len(prepared) == 2  # rank 1 has no batch in the last round


def test_plan_split_places() -> None:
    plan = plan_split([[0, 1, 2, 3], [4, 5]], rank=1, world_size=2, per_rank=2, even=True)
    assert [p.indices for p in plan] == [[2, 3], [0, 1]]
    assert plan[1].place == BatchPlace(start=6, size=0, padding=2, round_padding=2)


# --- iterable datasets -------------------------------------------------------------------------


class Stream(IterableDataset[Tensor]):
    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[Tensor]:
        return iter(torch.arange(self.count))


@pytest.mark.parametrize("dispatch", [None, False])
@pytest.mark.parametrize("size", [40, 37, 5])
@pytest.mark.parametrize("split", [False, True])
def test_iterable_rounds_reconstruct_the_stream(
    dispatch: bool | None, size: int, split: bool
) -> None:
    batch = 8 if split else 4
    config = DataLoaderConfiguration(dispatch_batches=dispatch, split_batches=split)
    ranks = run_ranks(lambda: DataLoader(Stream(size), batch_size=batch), config=config, epochs=2)
    reference = [flat(b) for b in DataLoader(Stream(size), batch_size=8)]
    for epoch in range(2):
        got = rounds([r[epoch] for r in ranks])
        assert len(got) == len(reference)
        assert got[:-1] == reference[:-1]
        last = reference[-1]
        assert got[-1][: len(last)] == last
        assert len(got[-1]) == 8  # padded from the start of the stream
        assert all(len(flat(b)) == 4 for r in ranks for b in r[epoch])


def test_iterable_without_padding_and_with_drop_last() -> None:
    config = DataLoaderConfiguration(even_batches=False)
    ranks = run_ranks(lambda: DataLoader(Stream(10), batch_size=4), config=config)
    assert [flat(b) for b in ranks[0][0]] == [[0, 1, 2, 3], [8, 9]]
    assert [flat(b) for b in ranks[1][0]] == [[4, 5, 6, 7]]
    dropped = run_ranks(lambda: DataLoader(Stream(10), batch_size=4, drop_last=True))
    assert [flat(b) for b in dropped[1][0]] == [[4, 5, 6, 7]]


class UnevenEnd(Recorder):
    """Rank 1 of a non-dispatched stream whose other rank ran out after one round."""

    def __init__(self) -> None:
        super().__init__(WORLD)
        self.rank = 1
        self.calls = 0

    def all_gather(self, tensor: Tensor) -> Tensor:
        self.calls += 1
        other = torch.tensor([1 if self.calls == 1 else 0])
        return torch.cat([other, tensor])


def test_non_dispatched_stream_ends_together() -> None:
    collectives = UnevenEnd()
    prepared = prepare(
        DataLoader(Stream(40), batch_size=4),
        collectives,
        DataLoaderConfiguration(dispatch_batches=False),
    )
    assert [flat(b) for b in prepared] == [[4, 5, 6, 7]]  # stops when rank 0 has no more
    assert collectives.calls == 2


def test_plain_list_of_batches_is_shared_whole() -> None:
    batches = [torch.arange(3) + 3 * index for index in range(5)]
    ranks = run_ranks(lambda: batches)
    assert [flat(b) for b in ranks[1][0]] == [[3, 4, 5], [9, 10, 11], [0, 1, 2]]
    assert len(ranks[0][0]) == 3


def test_sharded_batches_still_move_to_the_device() -> None:
    accelerator = Accelerator(cpu=True)
    meta = torch.device("meta")
    prepared = prepare_loader(
        DataLoader(indices(8), batch_size=2),
        accelerator.gradient_state,
        meta,
        accelerator.precision,
        DataLoaderConfiguration(non_blocking=True),
        collectives=Recorder(WORLD),
    )
    batches = list(prepared)
    assert len(batches) == 2
    assert all(batch[0].device == meta for batch in batches)
