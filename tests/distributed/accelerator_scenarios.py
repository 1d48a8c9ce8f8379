"""The Accelerator in two processes, started by ``ember launch --num_processes 2``: every
scenario runs in this one launch and rank 0 writes what the tests assert on (JSON).

Each training scenario computes its one-process reference with plain PyTorch on the full
global batch (the same seeded model and data), so the comparison is exact up to float
reduction order.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, DataLoaderConfiguration, get_logger
from ember.accelerator import distributed

BATCH = 4  # per process


def model_and_data(samples: int = 32) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 3, generator=generator)
    y = torch.randn(samples, 1, generator=generator)
    return model, TensorDataset(x, y)


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def collectives() -> dict[str, Any]:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    gathered = accelerator.gather(torch.arange(rank + 1))  # sizes 1 and 2
    order: list[str] = []
    with accelerator.main_process_first():
        order.append(f"rank{rank}")
    padded = accelerator.pad_across_processes(torch.ones(rank + 1, 2), dim=0, pad_index=-1)
    with accelerator.split_between_processes(list(range(5))) as share:
        shares = distributed.all_gather_object(share)
    value = torch.tensor([float(rank + 1)])
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = get_logger("scenario", log_level="INFO")
    logger.logger.addHandler(handler)
    logger.info("main only")
    logger.info("everyone", main_process_only=False)
    return {
        "num_processes": accelerator.num_processes,
        "process_index": rank,
        "is_main_process": accelerator.is_main_process,
        "is_local_main_process": accelerator.is_local_main_process,
        "distributed_type": str(accelerator.distributed_type),
        "state": repr(accelerator.state),
        "gathered": gathered.tolist(),
        "padded": padded.tolist(),
        "shares": shares,
        "sum": accelerator.reduce(value, "sum").item(),
        "mean": accelerator.reduce(value, "mean").item(),
        "min": accelerator.reduce(value, "min").item(),
        "max": accelerator.reduce(value, "max").item(),
        "broadcast_tensor": accelerator.broadcast(torch.tensor([rank + 10])).tolist(),
        "broadcast_object": accelerator.broadcast({"from": rank}, from_process=1),
        "logged": records,
        "order": distributed.all_gather_object(order),
    }


def equivalence(accumulate: int, shuffle: bool) -> dict[str, Any]:
    """2 processes x batch 4 (accumulation, shuffling) against one process x batch 8."""
    model, dataset = model_and_data()
    reference = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(5)  # the sampler draws its order from torch's RNG, on rank 0
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=shuffle)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    seen: list[list[float]] = []
    for epoch in range(2):
        for x, y in loader:
            with accelerator.accumulate(model):
                if epoch == 0:
                    seen.append(accelerator.gather(x[:, 0]).tolist())
                accelerator.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    # The reference: one process, the same sampler draws, batch 8.
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(5)
    ref_loader = DataLoader(dataset, batch_size=2 * BATCH, shuffle=shuffle)
    ref_seen = []
    for epoch in range(2):
        for index, (x, y) in enumerate(ref_loader):
            if epoch == 0:
                ref_seen.append(x[:, 0].tolist())
            (F.mse_loss(reference(x), y) / accumulate).backward()
            if (index + 1) % accumulate == 0:
                ref_optimizer.step()
                ref_optimizer.zero_grad()
    return {
        "difference": max_difference(accelerator.unwrap_model(model), reference),
        "same_batches": seen == ref_seen,
    }


def uneven_items() -> dict[str, Any]:
    """Summed losses with num_items that differ per rank and per batch: the update divides by
    the global count, as one process over the whole batch."""
    model, dataset = model_and_data(16)
    reference = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(dataset, batch_size=BATCH)
    )
    rank = accelerator.process_index

    def weights(size: int, offset: int) -> torch.Tensor:  # which samples count (uneven)
        return torch.tensor([float((offset + i) % 3 != 0) for i in range(size)])

    for step, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            mask = weights(len(x), step * 2 * BATCH + rank * BATCH)
            loss = ((model(x) - y).pow(2).squeeze(1) * mask).sum()
            accelerator.backward(loss, num_items=int(mask.sum().item()))
            optimizer.step()
            optimizer.zero_grad()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x_all, y_all = dataset.tensors
    # One window: 2 global batches of 8 = all 16 samples, divided by their total count.
    mask = weights(16, 0)
    loss = ((reference(x_all) - y_all).pow(2).squeeze(1) * mask).sum()
    (loss / mask.sum()).backward()
    ref_optimizer.step()
    return {"difference": max_difference(accelerator.unwrap_model(model), reference)}


def no_sync_and_scheduler() -> dict[str, Any]:
    """Mid-window gradients stay local; a prepared scheduler steps num_processes times per
    real optimizer step (Accelerate's convention)."""
    model, dataset = model_and_data()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler, loader = accelerator.prepare(
        model, optimizer, scheduler, DataLoader(dataset, batch_size=BATCH)
    )
    local_then_synced = []
    for index, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            grad = next(accelerator.unwrap_model(model).parameters()).grad.clone()
            both = distributed.all_gather_object(grad.tolist())
            local_then_synced.append(both[0] == both[1])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if index == 1:
            break
    return {
        "equal_across_ranks": local_then_synced,  # [False (local), True (all-reduced)]
        "lr_after_one_step": optimizer.param_groups[0]["lr"],
    }


def even_batches_gather() -> dict[str, Any]:
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=True)
    )
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(99)), batch_size=8))
    collected: list[int] = []
    for (batch,) in loader:
        collected += accelerator.gather_for_metrics(batch).tolist()
    return {"collected": collected}


def trainer_stops_together() -> dict[str, Any]:
    """A callback asks to stop on rank 1 only: both ranks stop at the same step (one later),
    no hang. And a training loader that would not be padded is refused, not hung on."""
    from ember import Callback, MisconfigurationError, Trainer, TrainModule

    class Regression(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(3, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class StopOnRankOne(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_rank == 1 and trainer.global_step == 3:
                trainer.should_stop = True

    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
    }
    _, dataset = model_and_data(80)
    trainer = Trainer(max_epochs=3, callbacks=[StopOnRankOne()], **kwargs)
    trainer.fit(Regression(), DataLoader(dataset, batch_size=BATCH))
    uneven = Trainer(
        max_epochs=1, dataloader_config=DataLoaderConfiguration(even_batches=False), **kwargs
    )
    try:
        uneven.fit(Regression(), DataLoader(TensorDataset(*dataset[:42]), batch_size=BATCH))
        refused = ""
    except MisconfigurationError as error:
        refused = str(error)
    return {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "should_stop": trainer.should_stop,
        "refused": refused,
    }


def trackers_write_on_rank_zero(output: Path) -> dict[str, Any]:
    """``log_with="csv"`` on two processes, each with its own ``project_dir``: only rank 0's
    is created and written; rank 1's tracker is blank, and both check the same values (a bad
    one fails everywhere)."""
    rank = distributed.global_rank()
    project_dir = output.parent / f"tracking_rank{rank}"
    accelerator = Accelerator(cpu=True, log_with="csv", project_dir=project_dir)
    accelerator.init_trackers("two_ranks", config={"rank": rank})
    accelerator.log({"rank": torch.tensor(float(rank))}, step=0)
    accelerator.get_tracker("csv", unwrap=True).save()  # blank on rank 1: does nothing
    try:
        accelerator.log({"bad": torch.ones(2)})
        refused = ""
    except Exception as error:
        refused = f"{type(error).__name__}: {error}"
    accelerator.end_training()
    # As the diffusers scripts do: init_trackers on the main process only; log and
    # get_tracker on every process, where rank 1 has no trackers at all.
    main_only = Accelerator(cpu=True, log_with="csv", project_dir=project_dir)
    if main_only.is_main_process:
        main_only.init_trackers("main_only")
    for step in range(2):
        main_only.log({"loss": torch.tensor(0.5 * (step + 1))}, step=step)
    main_only.get_tracker("csv", unwrap=True).save()
    main_only.end_training()
    return {
        "exists": project_dir.exists(),
        "refused": refused,
        "folder": str(project_dir),
        "main_only_trackers": len(main_only.trackers),
    }


def main(output: Path) -> None:
    results = {
        "collectives": collectives(),
        "equivalence": equivalence(accumulate=1, shuffle=False),
        "equivalence_accumulate_shuffle": equivalence(accumulate=2, shuffle=True),
        "uneven_items": uneven_items(),
        "no_sync_and_scheduler": no_sync_and_scheduler(),
        "even_batches_gather": even_batches_gather(),
        "trainer_stops_together": trainer_stops_together(),
        "trackers_write_on_rank_zero": trackers_write_on_rank_zero(output),
    }
    every_rank = distributed.all_gather_object(results)
    if distributed.global_rank() == 0:
        output.write_text(json.dumps(every_rank))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
