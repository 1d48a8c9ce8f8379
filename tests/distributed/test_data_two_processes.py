"""Sharded loaders in two real processes (gloo on 127.0.0.1), one launch of
``data_scenarios.py`` for every test: what each rank saw, against one process with batch
N x B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.distributed.launching import run_two_processes

SCRIPT = Path(__file__).with_name("data_scenarios.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("two_processes")
    run_two_processes(SCRIPT, str(out))
    results: list[dict[str, Any]] = json.loads((out / "results.json").read_text())
    return results


def numbers(count: int) -> TensorDataset:
    return TensorDataset(torch.arange(count))


def big_batches(loader: DataLoader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


def steps(per_rank: list[list[list[int]]]) -> list[list[int]]:
    """Each step's batches of every rank, concatenated in rank order (what gather sees)."""
    count = max(len(batches) for batches in per_rank)
    return [
        [value for batches in per_rank if step < len(batches) for value in batches[step]]
        for step in range(count)
    ]


@pytest.mark.parametrize("size", [82, 99, 512])
@pytest.mark.parametrize("split", [False, True])
def test_sequential_steps_are_the_big_batches_and_gather_is_exact(
    ranks: list[dict[str, Any]], size: int, split: bool
) -> None:
    runs = [rank[f"sequential/{size}/split={split}"] for rank in ranks]
    reference = big_batches(DataLoader(numbers(size), batch_size=16))
    got = steps([run["batches"] for run in runs])
    assert len(runs[0]["batches"]) == len(runs[1]["batches"]) == len(reference)
    assert got[:-1] == reference[:-1]
    assert got[-1][: len(reference[-1])] == reference[-1]
    assert all(len(batch) == 8 for run in runs for batch in run["batches"])  # even batches
    for run in runs:  # every rank gathers the dataset, each sample once, in order
        assert run["gathered"] == list(range(size))


@pytest.mark.parametrize("size", [82, 99, 512])
def test_uneven_batches_repeat_nothing(ranks: list[dict[str, Any]], size: int) -> None:
    per_rank = [rank[f"uneven/{size}"] for rank in ranks]
    assert steps(per_rank) == big_batches(DataLoader(numbers(size), batch_size=16))


def test_nested_and_object_outputs_are_gathered_exactly(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert rank["nested"] == list(range(82))
        assert rank["objects"] == [f"s{index}" for index in range(82)]


@pytest.mark.parametrize(("name", "seed"), [("seeded", 7), ("rank-seeded", 100)])
def test_shuffled_order_is_the_one_process_order(
    ranks: list[dict[str, Any]], name: str, seed: int
) -> None:
    # Rank 0's global generator decides, exactly as the one process's would.
    torch.manual_seed(seed)
    loader = DataLoader(numbers(50), batch_size=8, shuffle=True)
    for epoch in range(2):
        reference = big_batches(loader)
        got = steps([rank[f"shuffled/{name}"][epoch] for rank in ranks])
        assert got[:-1] == reference[:-1]
        assert got[-1][: len(reference[-1])] == reference[-1]


def test_seedable_sampler_uses_data_seed_and_epoch(ranks: list[dict[str, Any]]) -> None:
    for epoch in range(2):
        order = torch.randperm(30, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        got = steps([rank["seedable"][epoch] for rank in ranks])
        assert [value for step in got for value in step] == order


@pytest.mark.parametrize("dispatch", [None, False])
def test_iterable_dataset_rounds(ranks: list[dict[str, Any]], dispatch: bool | None) -> None:
    runs = [rank[f"iterable/dispatch={dispatch}"] for rank in ranks]
    reference = big_batches(DataLoader(numbers(37), batch_size=8))
    got = steps([run["batches"] for run in runs])
    assert got[:-1] == reference[:-1]
    assert got[-1][:5] == reference[-1] and len(got[-1]) == 8
    for run in runs:
        assert run["gathered"] == list(range(37))


def test_a_stream_that_ends_early_on_one_rank_ends_everywhere(
    ranks: list[dict[str, Any]],
) -> None:
    # Rank 1's stream has 13 samples: 4 batches, so 2 rounds (its short last round padded
    # from its start); rank 0's has 10 batches, but the pass ends for both after 2 rounds.
    assert ranks[0]["iterable/uneven-stream"] == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert ranks[1]["iterable/uneven-stream"] == [[4, 5, 6, 7], [12, 0, 1, 2]]


def test_evaluation_loader_is_unpadded_and_reassembles_in_order(
    ranks: list[dict[str, Any]],
) -> None:
    assert [rank["predict/batches"] for rank in ranks] == [7, 6]  # 99 samples, batch 8
    for rank in ranks:
        assert rank["predict"] == list(range(99))


def test_pad_across_processes(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["pad"] == [[1.0, 1.0]] * 2 + [[-1.0, -1.0]]
    assert ranks[1]["pad"] == [[1.0, 1.0]] * 3
    assert ranks[0]["pad/first"] == [[0.0, 1.0]] * 2


def test_skip_first_batches_keeps_the_epoch(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert rank["skip"]["rest"] == rank["skip"]["whole"][2:]
        assert rank["skip"]["epoch_after"] == 3
