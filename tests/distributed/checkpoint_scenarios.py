"""Run by ``test_checkpoints_ddp.py`` under ``torch.distributed.run`` with two processes
(gloo, CPU): checkpoints of a DDP fit. Rank 0 writes ``<out>/results.json``.

- exact: a fit interrupted mid-window and resumed on two processes ends with the weights of
  the fit never interrupted, bit for bit (dropout, shuffling, Adam, a scheduler).
- two_to_one: a checkpoint written mid-epoch by two processes, for the test process to resume
  on one; the samples the two processes saw before it are recorded.
- one_to_two: the test process's one-process checkpoint resumed here on two processes; the
  samples seen after it are recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ember
from ember import Callback, Trainer, TrainModule
from ember.accelerator import distributed
from tests.helpers import bare_trainer_kwargs

SAMPLES = 48


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 4, generator=generator)
    y = torch.randn(SAMPLES, 1, generator=generator)
    return TensorDataset(torch.arange(SAMPLES), x, y)


def shuffled(batch_size: int) -> DataLoader:
    return DataLoader(dataset(), batch_size=batch_size, shuffle=True)


class Net(TrainModule):
    """Adam, a per-step scheduler, optional dropout; records the indices it trains on."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.seen: list[tuple[int, int]] = []  # (epoch, sample index)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        index, x, y = batch
        self.seen.extend((self.current_epoch, int(i)) for i in index)
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class Items(Net):
    """A summed loss over a number of items that differs between ranks and batches."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        index, x, y = batch
        self.seen.extend((self.current_epoch, int(i)) for i in index)
        count = 1 + int(index[0]) % 4
        return {"loss": ((self.net(x[:count]) - y[:count]) ** 2).sum(), "num_items": count}


class Crash(Callback):
    def __init__(self, at: int, path: Path) -> None:
        self.at = at
        self.path = path

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.state.total_batch_idx == self.at:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("crash")


def options(**extra: Any) -> dict[str, Any]:
    return {**bare_trainer_kwargs(), "accelerator": "cpu", **extra}


def flat_weights(module: nn.Module) -> list[float]:
    return [value for tensor in module.state_dict().values() for value in tensor.flatten().tolist()]


def exact(out: Path, module_class: type[Net] = Net, name: str = "exact") -> dict[str, Any]:
    kwargs = options(max_epochs=2, accumulate_grad_batches=2, devices=2)
    ember.seed_everything(0)
    whole = module_class(dropout=0.3)
    Trainer(**kwargs).fit(whole, shuffled(4))
    ember.seed_everything(0)
    try:  # epoch 1, three batches processed: in the middle of a window of two
        Trainer(callbacks=[Crash(9, out / name)], **kwargs).fit(
            module_class(dropout=0.3), shuffled(4)
        )
    except RuntimeError:
        pass
    ember.seed_everything(1000 + distributed.global_rank())  # as a new process would be
    resumed = module_class(dropout=0.3)
    trainer = Trainer(**kwargs)
    trainer.fit(resumed, shuffled(4), ckpt_path=out / name)
    return {
        "equal": all(
            torch.equal(a, b)
            for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
        ),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }


def two_to_one(out: Path) -> dict[str, Any]:
    ember.seed_everything(0)
    module = Net()
    try:  # epoch 1, four batches of each process processed (a step boundary)
        Trainer(callbacks=[Crash(10, out / "two_to_one")], **options(max_epochs=2, devices=2)).fit(
            module, shuffled(4)
        )
    except RuntimeError:
        pass
    return {"seen": distributed.all_gather_object(module.seen)}


def one_to_two(out: Path) -> dict[str, Any]:
    ember.seed_everything(7)
    module = Net()
    trainer = Trainer(**options(max_epochs=2, devices=2))
    trainer.fit(module, shuffled(4), ckpt_path=out / "one_to_two")
    return {
        "seen": distributed.all_gather_object(module.seen),
        "weights": flat_weights(module),
        "global_step": trainer.global_step,
    }


def main(out: Path) -> None:
    results = {
        "exact": exact(out),
        # num_items differ between the ranks: each keeps its own count of the open window.
        "exact_items": exact(out, Items, "exact_items"),
        "two_to_one": two_to_one(out),
    }
    if (out / "one_to_two").exists():
        results["one_to_two"] = one_to_two(out)
    if distributed.global_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
