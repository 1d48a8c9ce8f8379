"""A prepared loader's position in a checkpoint: the pass in progress replays its epoch in the
same shuffled order and leaves out what was consumed, on the same number of processes (by
batches) or on another (by the global position: every sample of the epoch exactly once)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ember.accelerator.data import PreparedDataLoader, skip_first_batches
from tests.accelerator.test_sharding import Recorder, Replayer, flat, indices, prepare

NO_GENERATORS = {"loader": None, "sampler": None}


def shuffled(size: int = 40, batch_size: int = 4, **kwargs: Any) -> DataLoader:
    return DataLoader(indices(size), batch_size=batch_size, shuffle=True, **kwargs)


def _one_process(loader: DataLoader) -> PreparedDataLoader:
    return prepare(loader, None)


def _save_after(prepared: PreparedDataLoader, epochs: int, consumed: int) -> tuple[Any, list]:
    """Run ``epochs`` whole passes, then ``consumed`` batches of the next; return the state
    and the batches that pass would still have yielded."""
    for _ in range(epochs):
        list(prepared)
    iterator = iter(prepared)
    for _ in range(consumed):
        next(iterator)
    state = prepared.state_dict()
    return state, [flat(batch) for batch in iterator]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_pass_replays_the_rest_of_its_epoch(num_workers: int) -> None:
    torch.manual_seed(0)
    state, rest = _save_after(_one_process(shuffled(num_workers=num_workers)), 1, 3)
    assert state["epoch"] == 1 and state["batches"] == 3 and state["position"] == 12
    torch.manual_seed(99)  # a new process: another random state
    resumed = _one_process(shuffled(num_workers=num_workers))
    assert resumed.load_state_dict(state) == 3
    assert [flat(batch) for batch in resumed] == rest
    assert resumed.epoch == 2  # the pass after it is the next epoch


def test_the_global_random_state_is_left_as_it_was() -> None:
    torch.manual_seed(0)
    state, _ = _save_after(_one_process(shuffled()), 0, 2)
    resumed = _one_process(shuffled())
    resumed.load_state_dict(state)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    iter(resumed)  # draws the order from the saved state, then puts the current one back
    assert torch.equal(torch.rand(3), expected)


def test_skip_first_batches_after_a_restore_keeps_the_shuffled_order() -> None:
    # The bug the issue reproduced: a skipped loader lost the epoch's shuffled order.
    torch.manual_seed(0)
    prepared = _one_process(shuffled())
    list(prepared)
    state = prepared.state_dict()  # between passes: the next epoch, 0 batches
    iterator = iter(prepared)
    state = prepared.state_dict()
    whole = [flat(batch) for batch in iterator]
    torch.manual_seed(7)
    resumed = _one_process(shuffled())
    resumed.load_state_dict(state, batches=0)
    assert [flat(batch) for batch in skip_first_batches(resumed, 4)] == whole[4:]
    assert resumed.epoch == 2


def _ranks(world: int, make: Any, state: Any) -> list[list[list[int]]]:
    """Each rank of ``world`` resumed from ``state`` by position: its batches."""
    recorder = Recorder(world)
    first = prepare(make(), recorder)
    first.load_state_dict(state, by_position=True)
    per_rank = [[flat(batch) for batch in first]]
    for rank in range(1, world):
        other = prepare(make(), Replayer(rank, world, recorder.log))
        other.load_state_dict(state, by_position=True)
        per_rank.append([flat(batch) for batch in other])
    return per_rank


@pytest.mark.parametrize("consumed", [1, 3, 9])
def test_one_process_resumed_on_two_sees_every_remaining_sample_once(consumed: int) -> None:
    torch.manual_seed(0)
    state, rest = _save_after(_one_process(shuffled(40, 4)), 1, consumed)
    per_rank = _ranks(2, lambda: shuffled(40, 2), state)
    seen = sorted(value for batches in per_rank for batch in batches for value in batch)
    assert seen == sorted(value for batch in rest for value in batch)
    # Step by step, the two ranks' batches are the one process's global batches.
    assert [a + b for a, b in zip(per_rank[0], per_rank[1], strict=False)] == rest


def test_two_processes_resumed_on_one_see_every_remaining_sample_once() -> None:
    torch.manual_seed(0)
    recorder = Recorder(2)
    rank0 = prepare(shuffled(40, 2), recorder)
    rank1 = prepare(shuffled(40, 2), Replayer(1, 2, recorder.log))
    iterators = [iter(rank0), iter(rank1)]
    for _ in range(4):
        for iterator in iterators:
            next(iterator)
    state = rank0.state_dict()
    assert state["position"] == 16 and state["unit"] == "samples"
    rest = [value for iterator in iterators for batch in iterator for value in flat(batch)]
    resumed = _one_process(shuffled(40, 4))
    assert resumed.load_state_dict(state, by_position=True) == 4  # 16 samples of 4 a batch
    remaining = [value for batch in resumed for value in flat(batch)]
    assert sorted(remaining) == sorted(rest)
    assert len(remaining) == 40 - 16


def test_a_stream_cannot_continue_on_another_number_of_processes() -> None:
    from ember.errors import MisconfigurationError

    stream = _one_process([torch.zeros(1)] * 4)  # a list of batches: no sampler
    with pytest.raises(MisconfigurationError, match="map-style dataset"):
        stream.load_state_dict({"epoch": 0, "batches": 1, "rng": None}, by_position=True)


def test_a_plain_list_of_batches_replays_by_reading() -> None:
    batches = [torch.tensor([index]) for index in range(6)]
    prepared = _one_process(batches)
    iterator = iter(prepared)
    next(iterator), next(iterator)
    state = prepared.state_dict()
    resumed = _one_process(batches)
    resumed.load_state_dict(state)
    assert [int(batch) for batch in resumed] == [2, 3, 4, 5]


def test_state_dict_between_passes() -> None:
    prepared = _one_process(DataLoader(TensorDataset(torch.arange(8)), batch_size=4))
    assert prepared.state_dict() == {
        "epoch": 0,
        "batches": 0,
        "rng": None,
        "data_seed": None,
        "generators": NO_GENERATORS,
    }
    list(prepared)
    assert prepared.state_dict() == {
        "epoch": 1,
        "batches": 0,
        "rng": None,
        "data_seed": None,
        "generators": NO_GENERATORS,
    }
