"""The Trainer under DDP in two real processes (gloo on 127.0.0.1): one launch of
``trainer_scenarios.py`` for every test, compared with one process (a Trainer here, or the
plain PyTorch loops the script ran).

Exact epoch metrics for every ``reduce_fx`` and for torchmetrics (99 samples in batches of 8:
7 and 6 batches per rank; a loader of 5 samples that rank 1 never sees), names logged on some
ranks only, predictions in dataset order, big-batch equivalence (shuffled, accumulated,
``num_items``), early stopping together, validation mid-epoch, rank-zero-only output.
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader

from ember import Trainer
from tests.distributed.launching import run_two_processes
from tests.distributed.trainer_scenarios import EvalModule, Signal, eval_loader
from tests.helpers import bare_trainer_kwargs, regression_data

SCRIPT = Path(__file__).with_name("trainer_scenarios.py")
REDUCTIONS = ("mean", "sum", "min", "max", "count")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launch's folder: results.json, and what its loggers wrote."""
    return tmp_path_factory.mktemp("trainer_ddp")


@pytest.fixture(scope="module")
def ranks(out: Path) -> list[dict[str, Any]]:
    # W&B (scenario_file_loggers) offline, every folder of it inside `out`.
    wandb = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} if find_spec("wandb") else {}
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        wandb[variable] = str(out / "wandb_settings")
    run_two_processes(SCRIPT, str(out), EMBER_COLLECTIVE_TIMEOUT="60", **wandb)
    results: list[dict[str, Any]] = json.loads((out / "results.json").read_text())
    return results


def one_process(entry: str, dataloaders: Any) -> Any:
    trainer = Trainer(accelerator="cpu", **bare_trainer_kwargs())
    return getattr(trainer, entry)(EvalModule(), dataloaders)


def assert_close(got: dict[str, float], expected: dict[str, float], names: list[str]) -> None:
    for name in names:
        assert got[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9), name


# --- 1. exact epoch values with sync_dist=True, every reduce_fx ---------------------------------


@pytest.mark.parametrize("entry", ["validate", "test"])
def test_synced_values_equal_one_process(ranks: list[dict[str, Any]], entry: str) -> None:
    (expected,) = one_process(entry, eval_loader(99))
    assert expected["count"] == 99
    for rank in ranks:
        (got,) = rank[f"{entry}/99"]
        assert_close(got, expected, list(REDUCTIONS))
        # min and max are the true global ones, not a reduction of rounded values
        assert got["min"] == expected["min"] and got["max"] == expected["max"]


def test_mean_is_weighted_over_samples_not_a_mean_of_rank_means(
    ranks: list[dict[str, Any]],
) -> None:
    # 51 samples on rank 0, 48 on rank 1: the mean of the two ranks' means would differ.
    assert [rank["validate/99"][0]["local_count"] for rank in ranks] == [51.0, 48.0]
    (expected,) = one_process("validate", eval_loader(99))
    for rank in ranks:
        got = rank["validate/99"][0]["mean"]
        assert got == pytest.approx(expected["mean"], rel=1e-12)  # float64 partial sums
        assert got == pytest.approx(expected["sum"] / 99, rel=1e-7)  # float32 per-batch values


def test_values_without_sync_dist_stay_per_rank(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["validate/99"][0]["local_count"] != ranks[1]["validate/99"][0]["local_count"]


def test_a_rank_without_batches_contributes_nothing(ranks: list[dict[str, Any]]) -> None:
    # 5 samples: one batch, on rank 0. Rank 1 reports the same values (its weight is 0).
    (expected,) = one_process("validate", eval_loader(5, seed=2))
    for rank in ranks:
        (got,) = rank["validate/5"]
        assert_close(got, expected, [*REDUCTIONS, "tm_mse", "tm_seen"])
    assert "local_count" not in ranks[1]["validate/5"][0]  # nothing of its own to report


def test_limit_val_batches_counts_each_ranks_batches(ranks: list[dict[str, Any]]) -> None:
    trainer = Trainer(accelerator="cpu", limit_val_batches=0.5, **bare_trainer_kwargs())
    (expected,) = trainer.validate(EvalModule(), eval_loader(99))
    assert expected["count"] == 48  # 6 of 13 batches
    for rank in ranks:
        (got,) = rank["validate/99/limited"]
        assert_close(got, expected, [*REDUCTIONS, "tm_mse", "tm_seen"])


def test_several_loaders_each_exact(ranks: list[dict[str, Any]]) -> None:
    expected = one_process("validate", [eval_loader(99), eval_loader(5, seed=2)])
    for rank in ranks:
        got = rank["validate/99+5"]
        for index in (0, 1):
            names = [f"{name}/dataloader_idx_{index}" for name in (*REDUCTIONS, "tm_seen")]
            assert_close(got[index], expected[index], names)


# --- 2. torchmetrics ------------------------------------------------------------------------------


def test_torchmetrics_are_exact_over_all_samples(ranks: list[dict[str, Any]]) -> None:
    (expected,) = one_process("validate", eval_loader(99))
    for rank in ranks:
        (got,) = rank["validate/99"]
        assert got["tm_seen"] == 99.0
        assert got["tm_mse"] == pytest.approx(expected["tm_mse"], rel=1e-6)
        assert got["tm_mse"] == pytest.approx(got["mean"], rel=1e-6)


def test_torchmetrics_accumulate_over_several_loaders(ranks: list[dict[str, Any]]) -> None:
    # One metric object logged under both loaders' names: each name gets the value over both
    # loaders (it is reset only at epoch end, after every compute), as in one process.
    expected = one_process("validate", [eval_loader(99), eval_loader(5, seed=2)])
    for rank in ranks:
        got = rank["validate/99+5"]
        for index in (0, 1):
            name = f"tm_seen/dataloader_idx_{index}"
            assert got[index][name] == expected[index][name] == 104.0


# --- names logged on some ranks only ----------------------------------------------------------------


def test_a_name_logged_on_one_rank_is_an_error_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        message = rank["error/in-batch"]
        assert message is not None
        assert "'rank_zero_only' on ranks [0] but not on ranks [1]" in message
        assert "sync_dist=True" in message
    assert ranks[0]["error/in-batch"] == ranks[1]["error/in-batch"]


def test_a_name_logged_in_an_epoch_hook_on_one_rank_is_an_error(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        assert "'rank_one_only' on ranks [1] but not on ranks [0]" in rank["error/epoch-end"]


def test_different_reductions_of_one_name_are_an_error(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert "'x' (rank 0: min, rank 1: max)" in rank["error/reduce_fx"]


# --- 3. predict -------------------------------------------------------------------------------------


def test_predict_returns_every_prediction_once_in_order(ranks: list[dict[str, Any]]) -> None:
    expected = [output["prediction"].tolist() for output in one_process("predict", eval_loader(99))]
    assert [len(batch) for batch in expected] == [8] * 12 + [3]
    for rank in ranks:
        assert rank["predict/99"] == expected
        # each output is what predict_step returned on its rank: batch_idx counts per rank
        assert rank["predict/99/batch_idx"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]


def test_predict_with_several_loaders(ranks: list[dict[str, Any]]) -> None:
    expected = one_process("predict", [eval_loader(99), eval_loader(5, seed=2)])
    for rank in ranks:
        got = rank["predict/99+5"]
        assert got == [[output["prediction"].tolist() for output in part] for part in expected]


# --- 4. equivalence with one process and batch 2B ---------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "accumulate",
        "limited",
        "shuffled",
        "num_items/accumulate=1",
        "num_items/accumulate=2",
    ],
)
def test_two_processes_train_like_one_with_the_big_batch(
    ranks: list[dict[str, Any]], case: str
) -> None:
    for rank in ranks:
        assert rank[f"equivalence/{case}"]["difference"] < 1e-6
    assert ranks[0][f"equivalence/{case}"]["weights"] == ranks[1][f"equivalence/{case}"]["weights"]


def test_training_epoch_values_sync_and_steps_count_big_batches(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        assert rank["equivalence/plain"]["global_step"] == 16  # 2 epochs of 64 / (2 x 4)
        assert rank["equivalence/accumulate"]["global_step"] == 8
        assert rank["equivalence/limited"]["global_step"] == 8
        assert rank["equivalence/plain"]["samples"] == 64.0  # a synced sum over both ranks


# --- 5. stopping together, validation mid-epoch, rank zero ----------------------------------------


def test_early_stopping_stops_every_rank_together(ranks: list[dict[str, Any]]) -> None:
    # Only rank 0's (unsynced) signal is under the threshold; both stop after epoch 0.
    assert [rank["early_stopping"]["signal"] for rank in ranks] == [0.0, 1.0]
    for rank in ranks:
        assert rank["early_stopping"]["epoch"] == 1
        assert rank["early_stopping"]["global_step"] == 4
        assert rank["early_stopping"]["stopped_epoch"] == 0


def test_validation_mid_epoch_with_uneven_batches(ranks: list[dict[str, Any]]) -> None:
    trainer = Trainer(
        accelerator="cpu", max_epochs=2, val_check_interval=0.5, **bare_trainer_kwargs()
    )
    module = Signal()
    trainer.fit(module, DataLoader(regression_data(64), batch_size=8), eval_loader(99))
    expected = trainer.callback_metrics["val_loss"]
    for rank in ranks:
        assert rank["mid_epoch"]["global_step"] == 16
        assert rank["mid_epoch"]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert ranks[0]["mid_epoch"]["weights"] == ranks[1]["mid_epoch"]["weights"]
    weights = [value.reshape(-1).tolist() for value in module.state_dict().values()]
    for got, want in zip(ranks[0]["mid_epoch"]["weights"], weights, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-6


def test_rank_zero_writes_and_prints_alone(ranks: list[dict[str, Any]]) -> None:
    first, second = (rank["rank_zero"] for rank in ranks)
    assert (first["is_global_zero"], first["global_rank"], first["world_size"]) == (True, 0, 2)
    assert (second["is_global_zero"], second["global_rank"], second["world_size"]) == (False, 1, 2)
    assert first["logged"] > 0 and second["logged"] == 0
    assert first["printed"].count("Epoch") == 2 and second["printed"] == ""
    # the loggers got the synced values: every validation run's, every epoch's sample count
    assert len(first["logged_val_loss"]) == 4
    assert first["logged_val_loss"][-1] == ranks[0]["mid_epoch"]["val_loss"]
    assert first["logged_samples"] == [64.0, 64.0]
    assert all(math.isfinite(value) for value in first["logged_val_loss"])


def test_datamodule_prepares_once_per_machine(ranks: list[dict[str, Any]]) -> None:
    first, second = (rank["datamodule"] for rank in ranks)
    assert (first["prepared"], second["prepared"]) == (1, 0)  # local rank 0 only
    assert first["marker_at_setup"] and second["marker_at_setup"]  # the other one waited
    assert first["global_step"] == second["global_step"] == 4  # 32 samples, 2 x 4 per step


# --- 6. file loggers: rank zero writes one run per logger, with the synced values -------------


def test_rank_zero_alone_writes_one_run_per_logger(ranks: list[dict[str, Any]], out: Path) -> None:
    from tests.loggers.readback import csv_values, tensorboard_values, wandb_run

    pytest.importorskip("tensorboard")
    first, second = (rank["file_loggers"] for rank in ranks)
    assert first["val_loss"] == second["val_loss"]  # synced: the same on both ranks
    # Rank 1 reads trainer.log_dir and the last logger's version: rank 0's, created by none.
    assert second["seen"] == first["seen"]
    assert set(first["seen"]) == {str(out / "logs" / "ember" / "version_0")}
    assert second["last_version"] == first["last_version"]
    # One version folder (rank 1 made none), shared by the CSV and TensorBoard loggers.
    assert [p.name for p in (out / "logs" / "ember").iterdir()] == ["version_0"]
    folder = out / "logs" / "ember" / "version_0"
    written = {"csv": csv_values(folder / "metrics.csv"), "tensorboard": tensorboard_values(folder)}
    assert "TensorBoardLogger" in first["loggers"]
    if "WandbLogger" in first["loggers"]:
        (run_folder,) = (out / "logs" / "wandb").glob("offline-run-*")
        run = wandb_run(run_folder)
        assert run.exit_code == 0
        written["wandb"] = run.values()
        # W&B started on rank 0 during the fit: rank 1 knows its id from the validate call on.
        assert first["last_version"] == run.run_id
    for name, values in written.items():
        # The fit's last validation and the validate call, in order, at the last step (W&B
        # keeps one value per name and step: the validate call's).
        kept = 1 if name == "wandb" else 2
        points = values["val_loss"][-kept:]
        assert [step for step, _ in points] == [first["global_step"]] * kept, name
        expected = first["val_loss"][-kept:]
        assert [value for _, value in points] == pytest.approx(expected, rel=1e-6), name
        assert [value for _, value in values["samples"]] == [32.0, 32.0], name  # synced sums
        assert {value for _, value in values["signal"]} == {0.0}, name  # rank 0's own value
