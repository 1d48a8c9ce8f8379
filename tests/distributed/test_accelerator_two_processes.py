"""The Accelerator in two real processes started by ``ember launch`` (gloo on 127.0.0.1), and
a ``Trainer(devices=2)`` that starts its own second process from plain ``python script.py``:
one launch each, many assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.launching import clean_environment

SCRIPTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("accelerator") / "results.json"
    ember = Path(sys.executable).with_name("ember")
    command = [str(ember), "launch", "--num_processes", "2",
               str(SCRIPTS / "accelerator_scenarios.py"), str(out)]  # fmt: skip
    done = subprocess.run(
        command, env=clean_environment(), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results: list[dict[str, Any]] = json.loads(out.read_text())
    return results


def test_process_facts_and_state(ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ranks):
        facts = result["collectives"]
        assert facts["num_processes"] == 2
        assert facts["process_index"] == rank
        assert facts["is_main_process"] == (rank == 0)
        assert facts["is_local_main_process"] == (rank == 0)
        assert facts["distributed_type"] == "MULTI_CPU"
        assert "Distributed environment: MULTI_CPU" in facts["state"]
        assert f"Process index: {rank}" in facts["state"]
        assert "Num processes: 2" in facts["state"]


def test_collectives(ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ranks):
        facts = result["collectives"]
        assert facts["gathered"] == [0, 0, 1]  # sizes 1 and 2, in rank order
        assert facts["padded"] == ([[1, 1], [-1, -1]] if rank == 0 else [[1, 1], [1, 1]])
        assert facts["shares"] == [[0, 1, 2], [3, 4]]
        assert (facts["sum"], facts["mean"], facts["min"], facts["max"]) == (3, 1.5, 1, 2)
        assert facts["broadcast_tensor"] == [10]
        assert facts["broadcast_object"] == {"from": 1}
        # get_logger: "main only" on rank 0 only, "everyone" everywhere.
        assert facts["logged"] == (["main only", "everyone"] if rank == 0 else ["everyone"])


@pytest.mark.parametrize("scenario", ["equivalence", "equivalence_accumulate_shuffle"])
def test_two_processes_train_like_one_with_the_global_batch(
    ranks: list[dict[str, Any]], scenario: str
) -> None:
    for result in ranks:
        assert result[scenario]["same_batches"]
        assert result[scenario]["difference"] < 1e-6


def test_num_items_uneven_across_ranks_is_normalised_by_the_global_count(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        assert result["uneven_items"]["difference"] < 1e-6


def test_no_sync_mid_window_and_the_accelerate_scheduler_convention(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        scenario = result["no_sync_and_scheduler"]
        assert scenario["equal_across_ranks"] == [False, True]
        # One real optimizer step on 2 processes advances StepLR(gamma=0.5) twice.
        assert scenario["lr_after_one_step"] == pytest.approx(0.25)


def test_gather_for_metrics_returns_each_sample_once(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        assert result["even_batches_gather"]["collected"] == list(range(99))


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step(
    ranks: list[dict[str, Any]],
) -> None:
    """SPEC §4: ranks agree on a stop without a blocking collective per step; here rank 1
    asks at step 3, every rank stops at step 4 (no hang: the other rank would otherwise wait
    in the next all-reduce)."""
    for result in ranks:
        scenario = result["trainer_stops_together"]
        assert scenario["global_step"] == 4
        assert scenario["epoch"] == 0
        assert scenario["should_stop"] is True


def test_an_unpadded_training_loader_is_refused_under_several_processes(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        refused = result["trainer_stops_together"]["refused"]
        assert "even_batches=False" in refused and "every optimizer step" in refused


def test_only_rank_zero_tracks(ranks: list[dict[str, Any]]) -> None:
    """SPEC §5: log() writes on the main process only; rank 1 creates nothing and its
    values are checked the same way."""
    scenarios = [result["trackers_write_on_rank_zero"] for result in ranks]
    assert [scenario["exists"] for scenario in scenarios] == [True, False]
    assert not Path(scenarios[1]["folder"]).exists()
    folder = Path(scenarios[0]["folder"]) / "two_ranks"
    assert (folder / "metrics.csv").read_text().splitlines() == ["step,rank", "0,0.0"]
    assert "rank: 0" in (folder / "hparams.yaml").read_text()
    main_only = Path(scenarios[0]["folder"]) / "main_only" / "metrics.csv"
    assert main_only.read_text().splitlines() == ["step,loss", "0,0.5", "1,1.0"]
    assert [scenario["main_only_trackers"] for scenario in scenarios] == [1, 0]
    for result in ranks:
        assert result["trackers_write_on_rank_zero"]["refused"].startswith(
            "MisconfigurationError: `log` got 'bad' = a shape (2,) value"
        )


TRAINER_SCRIPT = """
import json, sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from ember import Trainer, TrainModule

class Regression(TrainModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    devices = int(sys.argv[1])
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=generator), torch.randn(64, 1, generator=generator)
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=devices, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, seed=0)
    module = Regression()
    train = DataLoader(TensorDataset(x, y), batch_size=8 // devices, shuffle=True)
    trainer.fit(module, train, DataLoader(TensorDataset(x, y), batch_size=8))
    if trainer.is_global_zero:
        print("RESULT " + json.dumps({"weight": module.net.weight.tolist(),
                                      "steps": trainer.global_step,
                                      "world_size": trainer.world_size}))
"""


def test_trainer_devices_2_from_plain_python_trains_like_one_process(tmp_path: Path) -> None:
    """Plain `python script.py` with Trainer(devices=2): the Trainer starts rank 1 itself;
    shuffled batches of 4 on 2 processes give the weights of batches of 8 on one."""
    script = tmp_path / "train.py"
    script.write_text(TRAINER_SCRIPT)
    results = {}
    for devices in (1, 2):
        done = subprocess.run(
            [sys.executable, str(script), str(devices)],
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-5000:]
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1  # printed by rank 0 only
        results[devices] = json.loads(lines[0].removeprefix("RESULT "))
    assert results[2]["world_size"] == 2
    assert results[1]["steps"] == results[2]["steps"] == 16
    for mine, theirs in zip(results[2]["weight"][0], results[1]["weight"][0], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)


FAILING_SCRIPT = """
import os, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from ember import Trainer, TrainModule

class Failing(TrainModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1 and batch_idx == 3:
            raise ValueError("bad batch on rank 1")
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = Trainer(max_epochs=100, accelerator="cpu", devices=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Failing(), DataLoader(data, batch_size=4))
"""


def test_a_rank_that_raises_mid_epoch_ends_the_run_quickly(tmp_path: Path) -> None:
    """Trainer(devices=2) from plain python, rank 1 raises at its 4th batch: both processes
    end well within 30 s (never the collectives' 30-minute timeout), the exit code is
    non-zero, and the traceback appears once, with its rank."""
    import time

    script = tmp_path / "failing.py"
    script.write_text(FAILING_SCRIPT)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 1, done.returncode  # the failing worker's own code
    assert elapsed < 30, elapsed
    output = done.stdout + done.stderr
    assert output.count("ValueError: bad batch on rank 1") == 1, output[-3000:]
    assert "[rank1]" in output
