"""A logger's run lasts as long as the logger: what a real ``fit`` + ``test`` (and a crash, a
resume, a SIGKILL) leaves on disk, read back with each tool's own reader and compared with
what the Trainer sent (recorded by a logger in the same list). Each scenario runs in a
subprocess (``run_script.py``) so that the runs end as they do for a user: at process exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ember import Trainer
from ember.loggers import CSVLogger, TensorBoardLogger
from ember.loggers.lifecycle import run_status
from tests.distributed.launching import clean_environment
from tests.helpers import MemoryLogger, TinyModule, loader
from tests.loggers import run_script
from tests.loggers.readback import (
    csv_values,
    hparams_tab,
    recorded_values,
    tensorboard_values,
    wandb_run,
)

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

SCRIPT = Path(run_script.__file__)


def run(mode: str, root: Path) -> subprocess.CompletedProcess[str]:
    """``run_script.py mode root`` with W&B offline and every W&B folder inside ``root``."""
    settings = root / "wandb_settings"
    env = clean_environment(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        **{name: str(settings) for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")},
        WANDB_DATA_DIR=str(settings),
    )
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_same_values(
    got: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]]
) -> None:
    """Same names, and for each the same steps in the same order with the same values
    (float32 precision: TensorBoard stores float32)."""
    assert sorted(got) == sorted(expected)
    for name, points in expected.items():
        assert [step for step, _ in got[name]] == [step for step, _ in points], name
        assert [value for _, value in got[name]] == pytest.approx(
            [value for _, value in points], rel=1e-6
        ), name


def expected(root: Path, mode: str) -> dict[str, list[tuple[int, float]]]:
    calls: list[list[Any]] = json.loads((root / f"expected-{mode}.json").read_text())
    return recorded_values(calls)


@pytest.fixture(scope="module")
def fit_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit_test")
    result = run("fit_test", root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def crashed_then_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    crashed = run("crash", root)
    assert crashed.returncode != 0 and "RuntimeError: crash" in crashed.stderr
    # What the crashed process left, before the resumed one touches it.
    (root / "after_crash.json").write_text(
        json.dumps(csv_values(root / "logs" / "ember" / "version_0" / "metrics.csv"))
    )
    resumed = run("resume", root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root


# --- one fit + one test: one run per logger -----------------------------------------------------


def test_each_run_is_finalized_once_at_exit_with_the_worst_status(
    fit_test: Path, crashed_then_resumed: Path
) -> None:
    def finalized(root: Path, mode: str) -> list[str]:
        return (root / f"expected-{mode}.finalized").read_text().split()

    assert finalized(fit_test, "fit_test") == ["success"]  # fit and test: one run, one end
    assert finalized(crashed_then_resumed, "crash") == ["failed"]
    assert finalized(crashed_then_resumed, "resume") == ["success"]


def test_fit_then_test_share_one_version_folder(fit_test: Path) -> None:
    # The CSV and TensorBoard loggers of one Trainer share version_0; nothing else is made.
    assert [p.name for p in (fit_test / "logs" / "ember").iterdir()] == ["version_0"]
    folder = fit_test / "logs" / "ember" / "version_0"
    names = sorted(p.name for p in folder.iterdir())
    assert names[:-1] == ["events" + names[0].removeprefix("events"), "hparams.yaml"]
    assert names[-1] == "metrics.csv"
    # One event file: the writer stayed open from the fit through the test.
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1


def test_fit_then_test_csv_holds_what_the_trainer_sent(fit_test: Path) -> None:
    values = expected(fit_test, "fit_test")
    assert {"train_loss_step", "val_loss", "train_loss_epoch", "test_loss"} <= set(values)
    got = csv_values(fit_test / "logs" / "ember" / "version_0" / "metrics.csv")
    assert_same_values(got, values)


def test_fit_then_test_tensorboard_holds_both_stages(fit_test: Path) -> None:
    values = expected(fit_test, "fit_test")
    assert_same_values(tensorboard_values(fit_test / "logs" / "ember" / "version_0"), values)
    # The HParams tab: the run's hyperparameters, each scalar's final value, a success.
    (tab,) = hparams_tab(fit_test / "logs").values()
    assert tab["hparams"] == {"lr": pytest.approx(0.05), "hidden": 8}
    assert tab["metrics"] == pytest.approx(
        {name: points[-1][1] for name, points in values.items()}, rel=1e-6
    )
    assert tab["status"] == "STATUS_SUCCESS"


def test_fit_then_test_is_one_wandb_run(fit_test: Path) -> None:
    (folder,) = (fit_test / "wandb").glob("offline-run-*")
    wandb = wandb_run(folder)
    assert folder.name.endswith(wandb.run_id)
    assert wandb.config == {"lr": 0.05, "hidden": 8}
    assert_same_values(wandb.values(), expected(fit_test, "fit_test"))
    assert wandb.exit_code == 0  # finished once, at exit, as a success


# --- a failed call, then a resumed fit: the same run, monotonic steps --------------------------


def test_a_failed_fit_is_flushed_and_its_wandb_run_marked_failed(
    crashed_then_resumed: Path,
) -> None:
    root = crashed_then_resumed
    after_crash = {
        name: [tuple(point) for point in points]
        for name, points in json.loads((root / "after_crash.json").read_text()).items()
    }
    sent = expected(root, "crash")
    assert sent["train_loss_step"][-1][0] == run_script.CRASH_AT - 1  # logged at 2, 4, 6
    assert_same_values(after_crash, sent)  # everything the crashed fit sent is on disk
    first, second = sorted((root / "wandb").glob("offline-run-*"))
    crashed = wandb_run(first)
    assert crashed.exit_code == 1  # the failure, recorded at exit
    assert_same_values(crashed.values(), sent)
    assert crashed.config == {"lr": 0.05, "hidden": 8}
    # Offline, the resumed run is a second folder with the same id (`wandb sync` merges).
    resumed = wandb_run(second)
    assert resumed.run_id == crashed.run_id
    assert resumed.exit_code == 0
    steps = [step for step, _ in resumed.values()["train_loss_step"]]
    assert min(steps) > run_script.CRASH_AT


def test_a_resumed_fit_continues_the_csv_and_tensorboard_run(crashed_then_resumed: Path) -> None:
    root = crashed_then_resumed
    assert [p.name for p in (root / "logs" / "ember").iterdir()] == ["version_0"]
    # Crash, then resume + test: each step once, in order, as one uninterrupted process.
    crashed, resumed = expected(root, "crash"), expected(root, "resume")
    whole = {name: crashed.get(name, []) + resumed.get(name, []) for name in {*crashed, *resumed}}
    steps = [step for step, _ in whole["train_loss_step"]]
    assert steps == sorted(set(steps)) == list(range(2, 17, 2))
    folder = root / "logs" / "ember" / "version_0"
    assert_same_values(csv_values(folder / "metrics.csv"), whole)
    assert_same_values(tensorboard_values(folder), whole)
    (tab,) = hparams_tab(root / "logs").values()
    assert tab["status"] == "STATUS_SUCCESS"  # the resumed run's end, not the crash


# --- a SIGKILL loses no row the Trainer had sent -------------------------------------------------


def test_csv_rows_survive_sigkill(tmp_path: Path) -> None:
    killed = run("kill", tmp_path)
    assert killed.returncode == -signal.SIGKILL
    got = csv_values(tmp_path / "logs" / "ember" / "version_0" / "metrics.csv")
    # The same fit in this process, stopped where the killed one died, sends these values.
    memory = MemoryLogger()
    Trainer(
        max_steps=run_script.KILL_AT - 1,
        logger=memory,
        log_every_n_steps=run_script.LOG_EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(run_script.Regression(), run_script.loader(0))
    sent = recorded_values([[step, metrics] for step, metrics in memory.metrics])
    assert [step for step, _ in got["train_loss_step"]] == [2, 4, 6, 8]
    # Up to the kill, every row is on disk: the last logging step's included.
    assert_same_values(got, sent)


# --- several loggers, one folder; a run ends at exit, not at each call -------------------------


def test_loggers_of_one_trainer_share_a_version_unless_given_one(tmp_path: Path) -> None:
    CSVLogger(tmp_path).log_metrics({"taken": 1.0}, step=0)  # version_0 is someone else's
    csv_logger, tensorboard = CSVLogger(tmp_path), TensorBoardLogger(tmp_path)
    other_name = CSVLogger(tmp_path, name="other")
    explicit = TensorBoardLogger(tmp_path, version=7)
    second_csv = CSVLogger(tmp_path)  # would write the same metrics.csv: not joined
    Trainer(logger=[csv_logger, tensorboard, other_name, explicit, second_csv])
    assert csv_logger.log_dir == tensorboard.log_dir == str(tmp_path / "ember" / "version_1")
    assert second_csv.log_dir == str(tmp_path / "ember" / "version_2")
    assert other_name.log_dir == str(tmp_path / "other" / "version_0")
    assert explicit.log_dir == str(tmp_path / "ember" / "version_7")


def test_a_logger_that_picked_its_folder_leads_the_others(tmp_path: Path) -> None:
    csv_logger, tensorboard = CSVLogger(tmp_path), TensorBoardLogger(tmp_path)
    TensorBoardLogger(tmp_path).log_dir  # noqa: B018  (picks version_0)
    picked = tensorboard.log_dir  # version_1, read before the Trainer joins them
    Trainer(logger=[csv_logger, tensorboard])
    assert csv_logger.log_dir == picked == str(tmp_path / "ember" / "version_1")


def test_each_call_saves_and_the_run_ends_once_with_its_worst_status(tmp_path: Path) -> None:
    class Broken(TinyModule):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            raise ValueError("broken test")

    memory = MemoryLogger()
    trainer = Trainer(
        max_epochs=1,
        logger=memory,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    module = Broken()
    trainer.fit(module, loader(16))
    saves = memory.saves
    assert memory.status is None and run_status(memory) == "success"
    with pytest.raises(ValueError, match="broken test"):
        trainer.test(module, loader(16))
    assert memory.saves == saves + 1  # flushed after the failed call too
    trainer.validate(module, loader(16))
    assert memory.status is None and run_status(memory) == "failed"  # a failure sticks
    memory.finalize("failed")  # the user ends it: nothing is left for the exit hook
    assert run_status(memory) is None
