"""Prepared data loaders, skipping batches, moving nested batches to a device, batch sizes
and the ``DataLoaderConfiguration`` defaults."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ember import Accelerator, DataLoaderConfiguration, MisconfigurationError
from ember.accelerator.data import infer_batch_size, move_to_device
from tests.helpers import regression_data

Pair = collections.namedtuple("Pair", ["inputs", "targets"])
# A device every machine has, on which every tensor visibly lands (CPU batches already are on
# the CPU, so moving to it would prove nothing).
META = torch.device("meta")


@dataclasses.dataclass
class Batch:
    tokens: Tensor
    mask: Tensor
    name: str = "batch"


class Movable:
    """Any object with a ``.to(device)`` method (a tokenizer's BatchEncoding, say)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def to(self, device: torch.device) -> Movable:
        return Movable(self.tensor.to(device))


def batches_equal(first: Any, second: Any) -> bool:
    if isinstance(first, Tensor):
        return isinstance(second, Tensor) and torch.equal(first, second)
    if isinstance(first, (list, tuple)):
        return (
            type(first) is type(second)
            and len(first) == len(second)
            and all(batches_equal(a, b) for a, b in zip(first, second, strict=True))
        )
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(
            batches_equal(first[key], second[key]) for key in first
        )
    return bool(first == second)


# --- prepared loaders ------------------------------------------------------------------------


def test_prepared_loader_keeps_batches_length_and_attributes() -> None:
    dataset = regression_data(21)
    loader = DataLoader(dataset, batch_size=4)
    prepared = Accelerator(cpu=True).prepare(loader)

    assert len(prepared) == len(loader) == 6
    assert prepared.dataset is dataset
    assert prepared.batch_size == 4
    assert prepared.sampler is loader.sampler
    raw = list(loader)
    got = list(prepared)
    assert len(got) == len(raw)
    assert all(batches_equal(a, b) for a, b in zip(got, raw, strict=True))
    assert len(got[-1][0]) == 1  # the short last batch is kept


def test_prepared_loader_of_dict_batches() -> None:
    samples = [{"x": torch.full((2,), float(index)), "label": index} for index in range(5)]
    loader = DataLoader(samples, batch_size=2)
    prepared = Accelerator(cpu=True).prepare(loader)
    assert all(batches_equal(a, b) for a, b in zip(prepared, loader, strict=True))
    assert len(list(prepared)) == 3


def test_prepared_empty_loader_yields_nothing() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 2)), batch_size=4)
    prepared = Accelerator(cpu=True).prepare(empty)
    assert len(prepared) == 0
    assert list(prepared) == []


def test_max_batches_ends_the_pass_early() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    loader = DataLoader(regression_data(40), batch_size=4)
    prepared = accelerator.prepare_data_loader(loader, max_batches=3)
    assert len(prepared) == 3
    raw = list(loader)[:3]
    flags = []
    got = []
    for batch in prepared:
        with accelerator.accumulate():
            flags.append(accelerator.sync_gradients)
        got.append(batch)
    assert all(batches_equal(a, b) for a, b in zip(got, raw, strict=True))
    assert len(got) == 3
    assert flags == [False, True, True]  # the cut-off batch closes its window


def test_set_epoch_reaches_the_sampler() -> None:
    class EpochSampler(Sampler[int]):
        def __init__(self, size: int) -> None:
            self.size = size
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __iter__(self) -> Iterator[int]:
            return iter(range(self.size))

        def __len__(self) -> int:
            return self.size

    sampler = EpochSampler(8)
    prepared = Accelerator(cpu=True).prepare(
        DataLoader(regression_data(8), sampler=sampler, batch_size=2)
    )
    prepared.set_epoch(3)
    assert sampler.epochs == []  # it takes effect when the next pass begins
    list(prepared)
    assert sampler.epochs == [3]
    list(prepared)  # each pass advances the epoch, as in a hand-written loop
    assert sampler.epochs == [3, 4]
    assert prepared.epoch == 5


def test_device_placement_false_leaves_batches_alone() -> None:
    accelerator = Accelerator(cpu=True, device_placement=False)
    loader = DataLoader(regression_data(8), batch_size=4)
    prepared = accelerator.prepare(loader)
    assert all(batches_equal(a, b) for a, b in zip(prepared, loader, strict=True))


# --- skipping batches ------------------------------------------------------------------------


@pytest.mark.parametrize("prepare_first", [True, False], ids=["prepared", "raw"])
def test_skip_first_batches_yields_the_rest(prepare_first: bool) -> None:
    accelerator = Accelerator(cpu=True)
    loader = DataLoader(regression_data(20), batch_size=4)
    source = accelerator.prepare(loader) if prepare_first else loader
    skipped = accelerator.skip_first_batches(source, num_batches=2)
    raw = list(loader)
    assert len(skipped) == len(raw) - 2
    rest = list(skipped)
    assert len(rest) == 3
    assert all(batches_equal(a, b) for a, b in zip(rest, raw[2:], strict=True))


def test_skip_more_batches_than_there_are() -> None:
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(regression_data(8), batch_size=4))
    skipped = accelerator.skip_first_batches(loader, num_batches=5)
    assert len(skipped) == 0
    assert list(skipped) == []


def test_skipped_loader_still_closes_the_last_window() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    loader = accelerator.prepare(DataLoader(regression_data(20), batch_size=4))
    flags = []
    for _ in accelerator.skip_first_batches(loader, num_batches=2):
        with accelerator.accumulate():
            flags.append(accelerator.sync_gradients)
    assert flags == [False, True, True]


# --- move_to_device --------------------------------------------------------------------------


def test_move_to_device_follows_nested_containers() -> None:
    batch = {
        "plain": torch.ones(2),
        "list": [torch.zeros(1), [torch.arange(3)]],
        "tuple": (torch.ones(1), "text"),
        "pair": Pair(torch.ones(2, 2), torch.zeros(2)),
        "record": Batch(torch.arange(4), torch.ones(4, dtype=torch.bool)),
        "movable": Movable(torch.ones(3)),
        "number": 5,
    }
    moved = move_to_device(batch, META)

    assert moved.keys() == batch.keys()
    assert moved["plain"].device == META
    assert isinstance(moved["list"], list)
    assert moved["list"][0].device == META
    assert moved["list"][1][0].device == META
    assert isinstance(moved["tuple"], tuple)
    assert moved["tuple"][0].device == META
    assert moved["tuple"][1] == "text"
    assert isinstance(moved["pair"], Pair)
    assert moved["pair"].inputs.device == META
    assert moved["pair"].targets.device == META
    assert isinstance(moved["record"], Batch)
    assert moved["record"].tokens.device == META
    assert moved["record"].mask.device == META
    assert moved["record"].mask.dtype == torch.bool
    assert moved["record"].name == "batch"
    assert moved["movable"].tensor.device == META
    assert moved["number"] == 5
    # The input is not modified in place.
    assert batch["plain"].device.type == "cpu"
    assert batch["record"].tokens.device.type == "cpu"


def test_move_to_device_keeps_the_mapping_type() -> None:
    ordered = collections.OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    moved = move_to_device(ordered, META)
    assert isinstance(moved, collections.OrderedDict)
    assert list(moved) == ["b", "a"]
    assert all(value.device == META for value in moved.values())


# --- infer_batch_size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        (torch.zeros(5, 3), 5),
        (torch.tensor(2.0), 1),
        ((torch.zeros(7, 2), torch.zeros(7)), 7),
        ([["not a tensor"], torch.zeros(3)], 3),
        ({"ids": torch.zeros(6, 4), "mask": torch.zeros(6, 4)}, 6),
        ({"meta": "text", "nested": {"x": torch.zeros(9)}}, 9),
        ({"meta": "text"}, 1),
        ("no tensor at all", 1),
    ],
    ids=["tensor", "scalar", "tuple", "list-nested", "dict", "dict-nested", "no-tensor", "string"],
)
def test_infer_batch_size(batch: Any, size: int) -> None:
    assert infer_batch_size(batch) == size


# --- DataLoaderConfiguration -----------------------------------------------------------------


def test_dataloader_configuration_defaults() -> None:
    config = DataLoaderConfiguration()
    assert config.split_batches is False
    assert config.dispatch_batches is None
    assert config.even_batches is True
    assert config.use_seedable_sampler is False
    assert config.data_seed is None
    assert config.non_blocking is False
    assert config.use_stateful_dataloader is False
    assert Accelerator(cpu=True).dataloader_config == config


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_prepared_loader_moves_nested_batches_to_cuda() -> None:
    samples = [{"x": torch.full((2,), float(index)), "label": index} for index in range(4)]
    accelerator = Accelerator()
    prepared = accelerator.prepare(DataLoader(samples, batch_size=2))
    for batch, raw in zip(prepared, DataLoader(samples, batch_size=2), strict=True):
        assert batch["x"].device.type == "cuda"
        assert batch["label"].device.type == "cuda"
        assert torch.equal(batch["x"].cpu(), raw["x"])


def _orders(accelerator: Accelerator, passes: int) -> list[list[int]]:
    indices = torch.arange(12).float().unsqueeze(1)
    loader = DataLoader(torch.utils.data.TensorDataset(indices), batch_size=12, shuffle=True)
    prepared = accelerator.prepare(loader)
    return [next(iter(prepared))[0].flatten().int().tolist() for _ in range(passes)]


def test_seedable_sampler_orders_depend_only_on_data_seed_and_epoch() -> None:
    config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=5)
    torch.manual_seed(1)
    first = _orders(Accelerator(cpu=True, dataloader_config=config), passes=3)
    torch.manual_seed(2)  # the global generator does not matter
    second = _orders(Accelerator(cpu=True, dataloader_config=config), passes=3)
    assert first == second
    assert first[0] != first[1] != first[2]  # a new order every epoch
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(5 + 1)).tolist()
    assert first[1] == expected
    other = _orders(
        Accelerator(
            cpu=True,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=6),
        ),
        passes=1,
    )
    assert other[0] != first[0]


def test_without_seedable_sampler_the_global_generator_decides() -> None:
    torch.manual_seed(1)
    first = _orders(Accelerator(cpu=True), passes=1)
    torch.manual_seed(2)
    second = _orders(Accelerator(cpu=True), passes=1)
    assert first != second


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"even_batches": "yes"}, "even_batches='yes'"),
        ({"split_batches": 3}, "split_batches=3"),
        ({"data_seed": "abc"}, "data_seed='abc'"),
        ({"data_seed": -1}, "data_seed=-1"),
        ({"dispatch_batches": 1}, "dispatch_batches=1"),
        ({"use_stateful_dataloader": True}, "StatefulDataLoader"),
    ],
)
def test_bad_dataloader_configuration(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MisconfigurationError) as error:
        DataLoaderConfiguration(**kwargs)
    assert fragment in str(error.value)


@pytest.mark.parametrize("samples", [16, 18])  # batches that divide the dataset, and not
def test_prepared_shuffling_loader_draws_the_plain_loaders_order_every_epoch(
    samples: int,
) -> None:
    def shuffling() -> DataLoader:
        data = TensorDataset(torch.arange(samples))
        return DataLoader(
            data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
        )

    plain = shuffling()
    expected = [[batch[0].tolist() for batch in plain] for _ in range(4)]
    prepared = Accelerator(cpu=True).prepare(shuffling())
    assert [[batch[0].tolist() for batch in prepared] for _ in range(4)] == expected
