"""Run by ``test_trainer_ddp.py`` under ``torch.distributed.run`` with two processes (gloo,
CPU): the Trainer under DDP, many scenarios in one launch. Rank 0 writes what every rank got
to ``<out>/results.json``; the tests compare it with one process (a Trainer in the test
process, or the plain PyTorch loops computed here).

The modules and loaders are importable (the tests build the one-process references from the
same definitions); only ``main`` runs anything.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ember import Callback, DataModule, Trainer, TrainModule
from ember.accelerator import distributed
from ember.callbacks import EarlyStopping, ProgressBar
from ember.errors import MisconfigurationError
from tests.helpers import MemoryLogger, bare_trainer_kwargs, regression_data

# --- evaluation: every reduction, torchmetrics, several loaders -------------------------------


def eval_loader(samples: int, batch_size: int = 8, seed: int = 1) -> DataLoader:
    return DataLoader(regression_data(samples, seed=seed), batch_size=batch_size)


class EvalModule(TrainModule):
    """A fixed linear model that logs one value per reduction, synced or not, and two
    torchmetrics objects, in validation and test."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.mse = torchmetrics.MeanSquaredError()
        self.seen = torchmetrics.SumMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        prediction = self(x)
        error = (prediction - y).pow(2).reshape(-1)
        self.log("mean", error.mean(), sync_dist=True)
        self.log("sum", error.sum(), reduce_fx="sum", sync_dist=True)
        self.log("min", error.min(), reduce_fx="min", sync_dist=True)
        self.log("max", error.max(), reduce_fx="max", sync_dist=True)
        self.log("count", float(x.shape[0]), reduce_fx="sum", sync_dist=True)
        self.log("local_count", float(x.shape[0]), reduce_fx="sum")  # stays per process
        self.mse(prediction, y)
        self.seen(torch.ones(x.shape[0]))
        self.log("tm_mse", self.mse)
        self.log("tm_seen", self.seen)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        x, _ = batch
        return {"prediction": self(x).reshape(-1), "index": batch_idx}


class OnlyOnRankZero(EvalModule):
    """Logs a synced name on rank 0 only, in every batch (an error, not a hang)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("everywhere", 1.0, sync_dist=True)
        if self.trainer.global_rank == 0:
            self.log("rank_zero_only", 1.0, sync_dist=True)


class EpochEndOnRankOne(EvalModule):
    """Logs a synced name in on_validation_epoch_end on rank 1 only."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("everywhere", 1.0, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.global_rank == 1:
            self.log("rank_one_only", 2.0, sync_dist=True)


class DifferentReductions(EvalModule):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("x", 1.0, sync_dist=True, reduce_fx="max" if self.trainer.global_rank else "min")


# --- training equivalence ------------------------------------------------------------------------


class Regression(TrainModule):
    """A small MLP trained with SGD on a mean loss; logs a synced sample count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.log(
            "samples",
            float(x.shape[0]),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Tokens(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Sequences of 6 tokens of 3 features, with 1 to 6 valid tokens (uneven counts)."""

    def __init__(self, samples: int = 48) -> None:
        generator = torch.Generator().manual_seed(5)
        self.x = torch.randn(samples, 6, 3, generator=generator)
        self.y = torch.randn(samples, 6, generator=generator)
        lengths = torch.randint(1, 7, (samples,), generator=generator)
        self.mask = (torch.arange(6)[None, :] < lengths[:, None]).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[index], self.y[index], self.mask[index]


def token_loss(net: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """The summed squared error over valid tokens, and their count."""
    x, y, mask = batch
    error = (net(x).squeeze(-1) - y).pow(2) * mask
    return error.sum(), mask.sum()


class TokenModule(TrainModule):
    """``num_items``: the loss is a sum over valid tokens, normalised by the global count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        loss, count = token_loss(self.net, batch)
        return {"loss": loss, "num_items": count}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def reference_weights(
    module: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    loss_of: Callable[[nn.Module, Any], tuple[Tensor, Tensor | None]],
    batches_per_epoch: int | None = None,
) -> dict[str, Tensor]:
    """One process, plain PyTorch: SGD on each batch of ``loader`` (the big batches)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    for _ in range(epochs):
        for index, batch in enumerate(loader):
            if index == batches_per_epoch:
                break
            loss, count = loss_of(module, batch)
            (loss / count if count is not None else loss).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def mean_loss(module: nn.Module, batch: Any) -> tuple[Tensor, None]:
    x, y = batch
    return nn.functional.mse_loss(module(x), y), None


def largest_difference(first: dict[str, Tensor], second: dict[str, Tensor]) -> float:
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def trained(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# --- the scenarios ---------------------------------------------------------------------------------


def trainer(**kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", **{**bare_trainer_kwargs(), **kwargs})


def scenario_validate() -> dict[str, Any]:
    results: dict[str, Any] = {}
    module = EvalModule()
    results["validate/99"] = trainer().validate(module, eval_loader(99))
    results["test/99"] = trainer().test(module, eval_loader(99))
    # 5 samples: one batch, on rank 0; rank 1 runs none of this loader.
    results["validate/99+5"] = trainer().validate(module, [eval_loader(99), eval_loader(5, seed=2)])
    results["validate/5"] = trainer().validate(module, eval_loader(5, seed=2))
    # 3 of each rank's 7 / 6 batches: the 6 first batches, as one process
    results["validate/99/limited"] = trainer(limit_val_batches=0.5).validate(
        module, eval_loader(99)
    )
    return results


def scenario_errors() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, module in (
        ("in-batch", OnlyOnRankZero()),
        ("epoch-end", EpochEndOnRankOne()),
        ("reduce_fx", DifferentReductions()),
    ):
        try:
            trainer().validate(module, eval_loader(40))
            results[f"error/{name}"] = None
        except MisconfigurationError as error:
            results[f"error/{name}"] = str(error)
    return results


def scenario_predict() -> dict[str, Any]:
    module = EvalModule()
    outputs = trainer().predict(module, eval_loader(99))
    several = trainer().predict(module, [eval_loader(99), eval_loader(5, seed=2)])
    return {
        "predict/99": [output["prediction"].tolist() for output in outputs],
        "predict/99/batch_idx": [output["index"] for output in outputs],
        "predict/99+5": [[output["prediction"].tolist() for output in part] for part in several],
    }


def scenario_equivalence() -> dict[str, Any]:
    results: dict[str, Any] = {}
    data = regression_data(64)
    cases: dict[str, tuple[dict[str, Any], int, int | None]] = {
        # name: (Trainer arguments, big batch and batches per epoch of the one-process loop)
        "plain": ({}, 8, None),
        "accumulate": ({"accumulate_grad_batches": 2}, 16, None),
        # a fraction of each process's share: 4 of 8 batches, as one process with batch 8
        "limited": ({"limit_train_batches": 0.5}, 8, 4),
    }
    for name, (trainer_arguments, big_batch, batches) in cases.items():
        module = Regression()
        fit = trainer(max_epochs=2, **trainer_arguments)
        fit.fit(module, DataLoader(data, batch_size=4))
        reference = reference_weights(
            Regression(), DataLoader(data, batch_size=big_batch), 2, 0.1, mean_loss, batches
        )
        results[f"equivalence/{name}"] = {
            "difference": largest_difference(trained(module), reference),
            "global_step": fit.global_step,
            "samples": fit.callback_metrics["samples"],
            "weights": [value.reshape(-1).tolist() for value in trained(module).values()],
        }
    # Shuffled: rank 0 draws each epoch's order from the loader's generator, as one process.
    module = Regression()
    fit = trainer(max_epochs=3)
    fit.fit(
        module,
        DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(11)),
    )
    reference = reference_weights(
        Regression(),
        DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(11)),
        3,
        0.1,
        mean_loss,
    )
    results["equivalence/shuffled"] = {
        "difference": largest_difference(trained(module), reference),
        "weights": [value.reshape(-1).tolist() for value in trained(module).values()],
    }
    # num_items: token counts differ across samples, so across ranks and micro-batches.
    tokens = Tokens(48)
    for accumulate, big_batch in ((1, 4), (2, 8)):
        module = TokenModule()
        trainer(max_epochs=2, accumulate_grad_batches=accumulate).fit(
            module, DataLoader(tokens, batch_size=2)
        )
        reference_module = TokenModule()
        reference = reference_weights(
            reference_module.net,
            DataLoader(tokens, batch_size=big_batch),
            2,
            0.05,
            token_loss,
        )
        results[f"equivalence/num_items/accumulate={accumulate}"] = {
            "difference": largest_difference(trained(module.net), reference),
            "weights": [value.reshape(-1).tolist() for value in trained(module).values()],
        }
    return results


class Signal(Regression):
    """Logs each rank's own number (not synced): rank 0 wants to stop, rank 1 does not."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("signal", float(self.trainer.global_rank))
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)


def scenario_stopping_and_rank_zero() -> dict[str, Any]:
    results: dict[str, Any] = {}
    stopper = EarlyStopping("signal", mode="min", stopping_threshold=0.5)
    fit = trainer(max_epochs=5, callbacks=[stopper])
    fit.fit(Signal(), DataLoader(regression_data(32), batch_size=4), eval_loader(21))
    results["early_stopping"] = {
        "epoch": fit.current_epoch,
        "global_step": fit.global_step,
        "stopped_epoch": stopper.stopped_epoch,
        "signal": fit.callback_metrics["signal"],
    }
    # Validation twice per epoch, with 7 / 6 validation batches per rank, and the sanity check.
    logger = MemoryLogger()
    stream = io.StringIO()
    fit = Trainer(
        accelerator="cpu",
        max_epochs=2,
        val_check_interval=0.5,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[ProgressBar(stream=stream)],
        enable_checkpointing=False,
    )
    module = Signal()
    fit.fit(module, DataLoader(regression_data(64), batch_size=4), eval_loader(99))
    results["mid_epoch"] = {
        "val_loss": fit.callback_metrics["val_loss"],
        "global_step": fit.global_step,
        "weights": [value.reshape(-1).tolist() for value in trained(module).values()],
    }
    results["rank_zero"] = {
        "is_global_zero": fit.is_global_zero,
        "global_rank": fit.global_rank,
        "world_size": fit.world_size,
        "logged": len(logger.metrics),
        "logged_val_loss": [value for _, value in logger.values("val_loss")],
        "logged_samples": [value for _, value in logger.values("samples")],
        "printed": stream.getvalue(),
    }
    return results


class PreparedOnce(DataModule):
    """``prepare_data`` writes a file slowly; ``setup`` records whether it is there."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker
        self.prepared = 0
        self.marker_at_setup = False

    def prepare_data(self) -> None:
        self.prepared += 1
        time.sleep(0.5)  # the other process must wait for it
        self.marker.write_text("ready")

    def setup(self, stage: str) -> None:
        self.marker_at_setup = self.marker.exists()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(32), batch_size=4)


def scenario_datamodule() -> dict[str, Any]:
    marker = Path(tempfile.gettempdir()) / f"ember-prepared-{os.environ['MASTER_PORT']}"
    data = PreparedOnce(marker)
    fit = trainer(max_epochs=1)
    fit.fit(Signal(), datamodule=data)
    distributed.barrier()
    if distributed.global_rank() == 0:
        marker.unlink()
    return {
        "datamodule": {
            "prepared": data.prepared,
            "marker_at_setup": data.marker_at_setup,
            "global_step": fit.global_step,
        }
    }


def scenario_file_loggers() -> dict[str, Any]:
    """A CSV, a TensorBoard and (when the launch set WANDB_MODE) a W&B logger on both ranks,
    for a fit then a validate: rank 0 alone writes, one run each, with the synced values."""
    from ember.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
    from ember.loggers.tensorboard import tensorboard_available

    root = Path(sys.argv[1]) / "logs"
    loggers: list[Logger] = [CSVLogger(root)]
    if tensorboard_available():
        loggers.append(TensorBoardLogger(root))
    if os.environ.get("WANDB_MODE") == "offline":
        loggers.append(WandbLogger(project="ember-ddp", save_dir=root))
    seen = LogDirProbe()
    fit = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=loggers,
        callbacks=[seen],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Signal()
    fit.fit(module, DataLoader(regression_data(32), batch_size=4), eval_loader(21))
    after_fit = fit.callback_metrics["val_loss"]
    (validated,) = fit.validate(module, eval_loader(21))
    return {
        "file_loggers": {
            "val_loss": [after_fit, validated["val_loss"]],
            "global_step": fit.global_step,
            "loggers": [type(logger).__name__ for logger in loggers],
            "seen": seen.seen,
            # Rank 0's run (W&B: started during the fit) as the validate call shared it.
            "last_version": loggers[-1].version,
        }
    }


class LogDirProbe(Callback):
    """Reads ``trainer.log_dir`` on every rank, as a user's print or a profiler would: rank 1
    must get rank 0's folder, without creating anything."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.seen.append(trainer.log_dir)

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        self.seen.append(trainer.log_dir)


SCENARIOS = (
    scenario_validate,
    scenario_errors,
    scenario_predict,
    scenario_equivalence,
    scenario_stopping_and_rank_zero,
    scenario_datamodule,
    scenario_file_loggers,
)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        results.update(scenario())
    every = distributed.all_gather_object(results)
    if distributed.global_rank() == 0:
        (out / "results.json").write_text(json.dumps(every))
    # Leave together: a process that exits while its peer still talks to it can abort in
    # gloo ("terminate called without an active exception").
    distributed.barrier()
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
