"""Run by ``test_data_two_processes.py`` under ``torch.distributed.run`` with two processes
(gloo, CPU): many loader scenarios in one launch. Rank 0 writes what every rank saw to
``<out>/results.json``; the tests compare it with one process and batch N x B."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_distributed
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ember import Accelerator, DataLoaderConfiguration
from ember.accelerator import distributed
from ember.accelerator.data import assemble_in_order


def accelerator(**config: Any) -> Accelerator:
    return Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**config))


class Stream(IterableDataset[Tensor]):
    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[Tensor]:
        return iter(torch.arange(self.count))


def numbers(count: int) -> TensorDataset:
    return TensorDataset(torch.arange(count))


def values(batch: Any) -> list[int]:
    tensor = batch[0] if isinstance(batch, (list, tuple)) else batch
    return [int(value) for value in tensor.reshape(-1).tolist()]


def epochs_of(loader: Any, count: int) -> list[list[list[int]]]:
    return [[values(batch) for batch in loader] for _ in range(count)]


def run() -> dict[str, Any]:
    rank = distributed.global_rank()
    results: dict[str, Any] = {}
    assert accelerator().num_processes == 2 and accelerator().process_index == rank

    # Sequential order, even batches, gather_for_metrics: each sample exactly once.
    for size in (82, 99, 512):
        for split in (False, True):
            acc = accelerator(split_batches=split)
            loader = acc.prepare(DataLoader(numbers(size), batch_size=16 if split else 8))
            batches, gathered = [], []
            for batch in loader:
                batches.append(values(batch))
                gathered += values(acc.gather_for_metrics(batch[0] * 1))
            results[f"sequential/{size}/split={split}"] = {"batches": batches, "gathered": gathered}
        acc = accelerator(even_batches=False)
        results[f"uneven/{size}"] = epochs_of(
            acc.prepare(DataLoader(numbers(size), batch_size=8)), 1
        )[0]

    # Nested outputs and plain objects through gather_for_metrics.
    acc = accelerator()
    loader = acc.prepare(DataLoader(numbers(82), batch_size=8))
    nested: list[int] = []
    objects: list[int] = []
    for (batch,) in loader:
        out = acc.gather_for_metrics({"pred": [batch * 2], "pair": (batch, batch + 1)})
        assert torch.equal(out["pair"][1], out["pair"][0] + 1)
        nested += [int(value) // 2 for value in out["pred"][0].tolist()]
        objects += acc.gather_for_metrics([f"s{int(value)}" for value in batch])
    results["nested"] = nested
    results["objects"] = objects

    # Shuffled: the same seed on both ranks, then a different seed on each rank.
    for name, seed in (("seeded", 7), ("rank-seeded", 100 + rank)):
        torch.manual_seed(seed)
        loader = accelerator().prepare(DataLoader(numbers(50), batch_size=4, shuffle=True))
        results[f"shuffled/{name}"] = epochs_of(loader, 2)
    torch.manual_seed(200 + rank)
    loader = accelerator(use_seedable_sampler=True, data_seed=3).prepare(
        DataLoader(numbers(30), batch_size=3, shuffle=True)
    )
    results["seedable"] = epochs_of(loader, 2)

    # Iterable datasets: dispatched (the default) and read by every rank.
    for dispatch in (None, False):
        acc = accelerator(dispatch_batches=dispatch)
        loader = acc.prepare(DataLoader(Stream(37), batch_size=4))
        batches, gathered = [], []
        for batch in loader:
            batches.append(values(batch))
            gathered += values(acc.gather_for_metrics(batch))
        results[f"iterable/dispatch={dispatch}"] = {"batches": batches, "gathered": gathered}
    # A stream shorter on one rank: the end is agreed, no hang.
    acc = accelerator(dispatch_batches=False)
    loader = acc.prepare(DataLoader(Stream(40 if rank == 0 else 13), batch_size=4))
    results["iterable/uneven-stream"] = epochs_of(loader, 1)[0]

    # Evaluation: unpadded, reassembled in order from the batch places.
    acc = accelerator()
    loader = acc.prepare_data_loader(DataLoader(numbers(99), batch_size=8), even_batches=False)
    pairs = [(place, batch[0] * 10) for place, batch in zip_places(loader)]
    everyone = distributed.all_gather_object(pairs)
    ordered = assemble_in_order([pair for part in everyone for pair in part])
    results["predict"] = [int(value) // 10 for out in ordered for value in out.tolist()]
    results["predict/batches"] = len(pairs)

    # pad_across_processes: rank r's tensor has r + 2 rows.
    padded = acc.pad_across_processes(torch.ones(rank + 2, 2), dim=0, pad_index=-1)
    results["pad"] = padded.tolist()
    results["pad/first"] = acc.pad_across_processes(
        torch.ones(2, rank + 1), dim=1, pad_index=0, pad_first=True
    ).tolist()

    # skip_first_batches on a sharded, shuffled loader keeps the epoch's order.
    acc = accelerator(use_seedable_sampler=True, data_seed=9)
    loader = acc.prepare(DataLoader(numbers(40), batch_size=4, shuffle=True))
    loader.set_epoch(2)
    whole = [values(batch) for batch in loader]
    loader.set_epoch(2)
    rest = [values(batch) for batch in acc.skip_first_batches(loader, 2)]
    results["skip"] = {"whole": whole, "rest": rest, "epoch_after": loader.epoch}
    return results


def zip_places(loader: Any) -> Iterator[tuple[Any, Any]]:
    for index, batch in enumerate(loader):
        yield loader.batch_places[index], batch


def main() -> None:
    torch_distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    results = run()
    everyone = distributed.all_gather_object(results)
    if distributed.global_rank() == 0:
        with open(f"{sys.argv[1]}/results.json", "w") as file:
            json.dump(everyone, file)
    distributed.destroy_process_group()  # together, bounded


if __name__ == "__main__":
    main()
