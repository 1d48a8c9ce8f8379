"""A fit resumed from a checkpoint continues each logger's run: checkpoint_state, continue_run."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.errors import MisconfigurationError
from ember.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def steps_and_losses(path: Path) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row["loss"])) for row in read_csv(path)[1] if row["loss"]]


def log_steps(logger: Logger, steps: range, scale: float = 1.0) -> None:
    for step in steps:
        logger.log_metrics({"loss": step * scale}, step=step)


def round_trip(state: dict[str, Any], tmp_path: Path) -> Any:
    """``state`` saved and loaded back the way ``state.pt`` is."""
    path = tmp_path / "state.pt"
    torch.save({"loggers": [state]}, path)
    return torch.load(path, weights_only=True)["loggers"][0]


class Minimal(Logger):
    @property
    def name(self) -> str:
        return "minimal"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        pass


def test_a_custom_logger_keeps_nothing_by_default() -> None:
    logger = Minimal()
    assert logger.checkpoint_state() == {}
    logger.continue_run({}, step=3)  # accepted, does nothing


# CSVLogger


def test_csv_continues_the_saved_version_without_the_rows_after_the_step(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path)
    log_steps(first, range(1, 11))
    state = round_trip(first.checkpoint_state(), tmp_path)
    first.finalize("failed")
    assert state == {"version": 0}
    someone_else = CSVLogger(tmp_path)  # version_1: the next free one is version_2
    someone_else.log_metrics({"loss": 0.0}, step=0)
    someone_else.finalize("success")

    resumed = CSVLogger(tmp_path)
    resumed.continue_run(state, step=6)
    log_steps(resumed, range(7, 10), scale=10.0)
    resumed.log_metrics({"val_loss": 0.5}, step=9)  # a new column after the resume
    resumed.finalize("success")

    assert resumed.log_dir == first.log_dir
    assert resumed.version == 0
    path = resumed.metrics_file
    assert steps_and_losses(path) == [
        *[(step, float(step)) for step in range(1, 7)],
        (7, 70.0),
        (8, 80.0),
        (9, 90.0),
    ]
    columns, rows = read_csv(path)
    assert columns == ["step", "loss", "val_loss"]
    assert rows[-1]["val_loss"] == "0.5"
    assert not list(path.parent.glob(".*.tmp")), "the temporary file of the rewrite is left"
    assert sorted(p.name for p in (tmp_path / "ember").iterdir()) == ["version_0", "version_1"]


def test_csv_an_explicit_version_wins(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path)
    log_steps(first, range(1, 11))
    first.finalize("success")

    other = CSVLogger(tmp_path, version="fresh")
    other.continue_run({"version": 0}, step=6)
    log_steps(other, range(7, 9))
    other.finalize("success")
    assert other.log_dir == str(tmp_path / "ember" / "fresh")
    assert [step for step, _ in steps_and_losses(other.metrics_file)] == [7, 8]
    assert len(steps_and_losses(first.metrics_file)) == 10, "another run's file was changed"

    # The same version given explicitly: its rows after the step are dropped all the same.
    same = CSVLogger(tmp_path, version=0)
    same.continue_run({"version": 0}, step=6)
    log_steps(same, range(7, 9), scale=10.0)
    same.finalize("success")
    assert steps_and_losses(first.metrics_file)[5:] == [(6, 6.0), (7, 70.0), (8, 80.0)]


def test_csv_without_saved_state_takes_the_next_free_version(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path)
    log_steps(first, range(1, 4))
    first.finalize("success")
    resumed = CSVLogger(tmp_path)
    resumed.continue_run({}, step=1)
    log_steps(resumed, range(2, 4))
    resumed.finalize("success")
    assert resumed.version == 1
    assert len(steps_and_losses(first.metrics_file)) == 3


def test_csv_a_str_version_is_continued(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path, name="exp", version="baseline")
    log_steps(first, range(1, 5))
    state = first.checkpoint_state()
    first.finalize("success")
    assert state == {"version": "baseline"}
    resumed = CSVLogger(tmp_path, name="exp")
    resumed.continue_run(state, step=2)
    log_steps(resumed, range(3, 5), scale=10.0)
    resumed.finalize("success")
    assert resumed.version == "baseline"
    assert steps_and_losses(first.metrics_file) == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_csv_checkpoint_state_names_the_folder_before_the_first_write(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    log_steps(logger, range(1, 3))  # buffered: nothing on disk yet
    assert logger.checkpoint_state() == {"version": 0}
    # Picked now: a logger created later cannot take it.
    assert CSVLogger(tmp_path).version == 1
    logger.finalize("success")
    assert len(steps_and_losses(tmp_path / "ember" / "version_0" / "metrics.csv")) == 2


def test_csv_a_folder_only_picked_is_given_up(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path)
    log_steps(first, range(1, 5))
    first.finalize("success")
    resumed = CSVLogger(tmp_path)
    assert resumed.log_dir.endswith("version_1")  # read (e.g. by a callback), still empty
    resumed.continue_run({"version": 0}, step=2)
    log_steps(resumed, range(3, 5), scale=10.0)
    resumed.finalize("success")
    assert resumed.version == 0
    assert steps_and_losses(first.metrics_file) == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert not (tmp_path / "ember" / "version_1").exists(), "the empty folder was left"


def test_csv_a_folder_already_written_is_kept_with_a_warning(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path)
    log_steps(first, range(1, 5))
    first.finalize("success")
    resumed = CSVLogger(tmp_path)
    resumed.log_hyperparams({"lr": 0.1})  # writes hparams.yaml into version_1
    with pytest.warns(UserWarning, match="version 0 of the checkpoint"):
        resumed.continue_run({"version": 0}, step=2)
    log_steps(resumed, range(3, 5))
    resumed.finalize("success")
    assert resumed.version == 1
    assert len(steps_and_losses(first.metrics_file)) == 4


def test_csv_the_same_logger_drops_its_written_and_buffered_rows_after_the_step(
    tmp_path: Path,
) -> None:
    logger = CSVLogger(tmp_path, flush_every=1000)
    log_steps(logger, range(1, 9))
    logger.save()
    log_steps(logger, range(9, 12))  # still buffered
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own folder: no warning
        logger.continue_run(logger.checkpoint_state(), step=6)
    log_steps(logger, range(7, 9), scale=10.0)
    logger.finalize("success")
    assert steps_and_losses(logger.metrics_file) == [
        *[(step, float(step)) for step in range(1, 7)],
        (7, 70.0),
        (8, 80.0),
    ]


def test_csv_a_bad_saved_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationError, match="single folder name"):
        CSVLogger(tmp_path).continue_run({"version": "../elsewhere"}, step=1)


# TensorBoardLogger


def scalar_steps(log_dir: str, tag: str = "loss") -> list[tuple[int, float]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def assert_monotonic(steps: list[tuple[int, float]]) -> None:
    numbers = [step for step, _ in steps]
    assert numbers == sorted(set(numbers)), f"steps repeat or go back: {numbers}"


def test_tensorboard_continues_the_saved_version_and_purges_after_the_step(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorboard")
    first = TensorBoardLogger(tmp_path)
    log_steps(first, range(1, 11))
    state = round_trip(first.checkpoint_state(), tmp_path)
    first.finalize("failed")
    assert state == {"version": 0}

    resumed = TensorBoardLogger(tmp_path)
    resumed.continue_run(state, step=6)
    log_steps(resumed, range(7, 10), scale=10.0)
    resumed.finalize("success")
    assert resumed.log_dir == first.log_dir
    steps = scalar_steps(resumed.log_dir)
    assert_monotonic(steps)
    assert steps == [*[(step, float(step)) for step in range(1, 7)], (7, 70), (8, 80), (9, 90)]

    # Only the first writer after continue_run purges: a later one keeps steps 7..9.
    resumed.log_metrics({"loss": 100.0}, step=10)
    resumed.finalize("success")
    assert scalar_steps(resumed.log_dir)[6:] == [(7, 70), (8, 80), (9, 90), (10, 100)]


def test_tensorboard_an_open_writer_is_reopened_with_the_purge(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path)
    log_steps(logger, range(1, 11))
    logger.continue_run(logger.checkpoint_state(), step=6)
    log_steps(logger, range(7, 9), scale=10.0)
    logger.finalize("success")
    steps = scalar_steps(logger.log_dir)
    assert_monotonic(steps)
    assert steps[5:] == [(6, 6.0), (7, 70), (8, 80)]


def test_tensorboard_purges_when_the_file_counter_gains_a_digit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files of one second and process are named ...9 then ...10, which sorts backwards."""
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import event_file_writer

    if not hasattr(event_file_writer, "AtomicCounter"):
        pytest.skip("tensorboard names its event files differently now")
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    first = TensorBoardLogger(tmp_path)
    log_steps(first, range(1, 11))
    first.finalize("failed")
    resumed = TensorBoardLogger(tmp_path)
    resumed.continue_run({"version": 0}, step=6)
    log_steps(resumed, range(7, 9), scale=10.0)
    resumed.finalize("success")
    steps = scalar_steps(resumed.log_dir)
    assert_monotonic(steps)
    assert steps[5:] == [(6, 6.0), (7, 70), (8, 80)]


def test_tensorboard_an_explicit_version_wins(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    first = TensorBoardLogger(tmp_path)
    log_steps(first, range(1, 11))
    first.finalize("success")
    other = TensorBoardLogger(tmp_path, version=3)
    other.continue_run({"version": 0}, step=6)
    log_steps(other, range(7, 9))
    other.finalize("success")
    assert other.log_dir == str(tmp_path / "ember" / "version_3")
    assert [step for step, _ in scalar_steps(other.log_dir)] == [7, 8]
    assert len(scalar_steps(first.log_dir)) == 10


# WandbLogger


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B kept off the network and inside ``tmp_path``."""
    pytest.importorskip("wandb")
    settings = tmp_path / "wandb_settings"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(settings))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_wandb_an_offline_run_is_resumed_with_steps_after_the_resumed_one(
    offline_wandb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_dir = offline_wandb / "runs"
    first = WandbLogger(project="ember-tests", save_dir=save_dir)
    assert first.checkpoint_state() == {}, "no run is started just to checkpoint"
    assert not save_dir.exists()
    log_steps(first, range(1, 11))
    run_id = first.version
    state = round_trip(first.checkpoint_state(), offline_wandb)
    first.finalize("failed")
    assert state == {"id": run_id}
    assert first.checkpoint_state() == state, "the id is kept after the run is finished"

    resumed = WandbLogger(project="ember-tests", save_dir=save_dir)
    resumed.continue_run(state, step=6)
    run = resumed.experiment
    assert run.id == run_id
    logged: list[int] = []
    real_log = run.log

    def spy(metrics: dict[str, float], step: int) -> None:
        logged.append(step)
        real_log(metrics, step=step)

    monkeypatch.setattr(run, "log", spy)
    log_steps(resumed, range(5, 10))
    resumed.finalize("success")
    assert logged == [7, 8, 9]
    folders = sorted(path.name for path in (save_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    assert all(run_id in folder for folder in folders)


class FakeRun:
    def __init__(self, run_id: str) -> None:
        self.id = run_id
        self.name = ""
        self.dir = "/somewhere/files"
        self.logged: list[int] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append(step)

    def finish(self, exit_code: int) -> None:
        pass


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``wandb.init`` replaced: each call is recorded and returns a run with the given id."""
    wandb = pytest.importorskip("wandb")
    calls: list[dict[str, Any]] = []

    def fake_init(**kwargs: Any) -> FakeRun:
        calls.append(kwargs)
        return FakeRun(kwargs.get("id") or "fresh")

    monkeypatch.setattr(wandb, "run", None)
    monkeypatch.setattr(wandb, "init", fake_init)
    return calls


def init_arguments(call: dict[str, Any]) -> dict[str, Any]:
    return {key: call[key] for key in ("id", "resume") if key in call}


@pytest.mark.parametrize(
    ("kwargs", "state", "expected"),
    [
        ({}, {"id": "saved"}, {"id": "saved", "resume": "allow"}),
        ({"id": None}, {"id": "saved"}, {"id": "saved", "resume": "allow"}),
        ({"id": "mine"}, {"id": "saved"}, {"id": "mine", "resume": "allow"}),
        ({"resume": "must"}, {"id": "saved"}, {"id": "saved", "resume": "must"}),
        ({}, {}, {}),
    ],
)
def test_wandb_init_arguments_of_a_resumed_run(
    tmp_path: Path,
    init_calls: list[dict[str, Any]],
    kwargs: dict[str, Any],
    state: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    logger = WandbLogger(save_dir=tmp_path, **kwargs)
    logger.continue_run(state, step=4)
    log_steps(logger, range(3, 7))
    assert [init_arguments(call) for call in init_calls] == [expected]
    assert logger.experiment.logged == [5, 6]
    assert logger.checkpoint_state() == {"id": expected.get("id", "fresh")}
    # A later use after finalize resumes the same run again.
    logger.finalize("success")
    logger.log_metrics({"loss": 1.0}, step=7)
    assert init_arguments(init_calls[-1]) == expected


def test_wandb_a_run_already_in_use_is_kept_with_a_warning(
    tmp_path: Path, init_calls: list[dict[str, Any]]
) -> None:
    logger = WandbLogger(save_dir=tmp_path)
    logger.log_metrics({"loss": 1.0}, step=0)
    with pytest.warns(UserWarning, match="'saved'"):
        logger.continue_run({"id": "saved"}, step=4)
    log_steps(logger, range(4, 6))
    assert logger.version == "fresh"
    assert logger.experiment.logged == [0, 5]
    assert len(init_calls) == 1
