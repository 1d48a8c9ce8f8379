"""Run by ``test_run_control_ddp.py`` under ``torch.distributed.run`` with two processes
(gloo, CPU): min_steps holding off a stop asked on one rank, max_time decided by one rank's
clock, estimated_stepping_batches of a sharded loader, the "simple" profiler's collectives wait. Rank 0 writes what every rank got to
``<out>/results.json``."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ember import Callback, Trainer
from ember.accelerator import distributed
from tests.helpers import TinyModule, bare_trainer_kwargs, regression_data


class StopOnRankZero(Callback):
    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_rank == 0:
            trainer.should_stop = True


class RankOneOutOfTime(Callback):
    """Rank 1's clock passes max_time after step 2 (rank 0's never does)."""

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 2:
            trainer.run_context.deadline = 0.0


class Estimate(TinyModule):
    def configure_optimizers(self) -> Any:
        self.estimate = self.trainer.estimated_stepping_batches
        return super().configure_optimizers()


class RankOneLate(TinyModule):
    """Rank 1's steps take 10 ms longer and its epoch ends 300 ms later: rank 0 waits for
    it in backward (DDP's gradient all-reduce) and at the vote between epochs."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_rank == 1:
            time.sleep(0.01)
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        if self.trainer.global_rank == 1:
            time.sleep(0.3)


def profiled() -> dict[str, Any]:
    """How often this rank printed the table, and its profiler's shares."""
    printed = io.StringIO()
    trainer = Trainer(accelerator="cpu", max_epochs=2, profiler="simple", **bare_trainer_kwargs())
    with contextlib.redirect_stdout(printed):
        trainer.fit(RankOneLate(), DataLoader(regression_data(64), batch_size=4))
    shares = trainer.profiler.shares()  # type: ignore[attr-defined]
    return {"tables": printed.getvalue().count("Profiler (simple)"), "shares": shares}


def fit(callback: Callback | None = None, **kwargs: Any) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        callbacks=[callback] if callback else None,
        **{**bare_trainer_kwargs(), **kwargs},
    )
    module = Estimate()
    trainer.fit(module, DataLoader(regression_data(64), batch_size=4))  # 8 batches per rank
    trainer.estimate = module.estimate  # type: ignore[attr-defined]
    return trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    held = fit(StopOnRankZero(), max_epochs=3, min_steps=5)
    timed = fit(RankOneOutOfTime(), max_epochs=3, max_time="01:00:00:00")
    estimated = fit(max_epochs=2, accumulate_grad_batches=3)
    profile = profiled()
    results = {
        "min_steps": [held.global_step, held.current_epoch, held.should_stop],
        "max_time": [timed.global_step, timed.current_epoch, timed.should_stop],
        "estimate": [estimated.estimate, estimated.global_step],  # type: ignore[attr-defined]
        "profile": profile,
    }
    every = distributed.all_gather_object(results)
    if distributed.global_rank() == 0:
        (out / "results.json").write_text(json.dumps(every))
    distributed.barrier()
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
