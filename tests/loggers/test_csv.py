"""CSVLogger: the CSV's header and rows, version folders, hparams.yaml, and the shared helpers."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import enum
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ember.errors import MisconfigurationError
from ember.loggers._files import next_free_version, sanitize
from ember.loggers.csv import CSVLogger


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as file:
        return list(csv.reader(file))


def test_rows_round_trip_and_new_names_extend_the_header(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": 1.5}, step=0)
    logger.log_metrics({"loss": 0.25}, step=1)
    logger.save()
    path = Path(logger.log_dir) / "metrics.csv"
    assert read_rows(path) == [["step", "loss"], ["0", "1.5"], ["1", "0.25"]]

    # A name first seen after a write rewrites the file with a wider header.
    logger.log_metrics({"loss": 0.125, "val_accuracy": 0.875}, step=2)
    logger.log_metrics({"epoch": 0}, step=3)
    logger.finalize("success")
    assert read_rows(path) == [
        ["step", "loss", "val_accuracy", "epoch"],
        ["0", "1.5", "", ""],
        ["1", "0.25", "", ""],
        ["2", "0.125", "0.875", ""],
        ["3", "", "", "0"],
    ]
    with path.open(newline="") as file:
        values = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(file)]
    assert values[2] == {"step": 2.0, "loss": 0.125, "val_accuracy": 0.875}
    assert not list(path.parent.glob(".*.tmp")), "the temporary file of the rewrite is left"


def test_each_row_is_on_disk_when_logged_and_same_step_calls_merge(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    path = logger.metrics_file
    logger.log_metrics({"train_loss": 1.0}, step=5)
    assert read_rows(path) == [["step", "train_loss"], ["5", "1.0"]]
    logger.log_metrics({"val_loss": 2.0}, step=5)  # merged into the row on disk
    assert read_rows(path) == [["step", "train_loss", "val_loss"], ["5", "1.0", "2.0"]]
    logger.log_metrics({"val_loss": 3.0}, step=5)  # same name again: a row of its own
    logger.log_metrics({"train_loss": 4.0}, step=5)  # merged into that one (no header change)
    logger.log_metrics({"train_loss": 0.5}, step=6)
    logger.log_metrics({"val_loss": 0.25}, step=6)
    assert read_rows(path) == [
        ["step", "train_loss", "val_loss"],
        ["5", "1.0", "2.0"],
        ["5", "4.0", "3.0"],
        ["6", "0.5", "0.25"],
    ]
    logger.finalize("success")
    logger.log_metrics({"train_loss": 0.125}, step=7)  # after finalize: appended again
    assert read_rows(path)[-1] == ["7", "0.125", ""]


def test_tensors_become_numbers_and_ints_stay_ints(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": torch.tensor(0.5), "epoch": 2}, step=0)
    logger.save()
    assert read_rows(Path(logger.log_dir) / "metrics.csv")[1] == ["0", "0.5", "2"]


def test_rows_wait_in_memory_until_save_or_the_buffer_fills(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, flush_every=3)
    path = logger.metrics_file
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_metrics({"loss": 1.0}, step=1)
    assert not path.exists()
    logger.log_metrics({"loss": 1.0}, step=2)  # the third row triggers the write
    assert len(read_rows(path)) == 4
    logger.log_metrics({"loss": 1.0}, step=3)
    assert len(read_rows(path)) == 4
    logger.finalize("failed")
    assert len(read_rows(path)) == 5


def test_creating_a_logger_writes_nothing(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path / "logs", name="experiment")
    assert logger.name == "experiment"
    assert not (tmp_path / "logs").exists()
    logger.log_metrics({"loss": 1.0}, step=0)  # the first row picks the folder
    assert (tmp_path / "logs" / "experiment" / "version_0" / "metrics.csv").is_file()


def test_versions_count_up_and_are_fixed_once_picked(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path)
    second = CSVLogger(tmp_path)
    assert first.version == 0
    # The first logger claimed version_0 by reading it, so the second cannot pick it too.
    assert second.version == 1
    assert second.log_dir == str(tmp_path / "ember" / "version_1")
    (tmp_path / "ember" / "version_7").mkdir()
    (tmp_path / "ember" / "version_x").mkdir()  # not a number: ignored
    assert first.version == 0
    assert CSVLogger(tmp_path).version == 8
    assert next_free_version(tmp_path / "missing") == 0


def test_explicit_versions_name_the_folder(tmp_path: Path) -> None:
    numbered = CSVLogger(tmp_path, version=3)
    named = CSVLogger(tmp_path, name="", version="baseline")
    numbered.log_metrics({"loss": 1.0}, step=0)
    numbered.save()
    named.log_hyperparams({"lr": 0.1})
    assert numbered.version == 3
    assert (tmp_path / "ember" / "version_3" / "metrics.csv").is_file()
    assert named.version == "baseline"
    assert named.log_dir == str(tmp_path / "baseline")
    assert (tmp_path / "baseline" / "hparams.yaml").is_file()


def test_a_reused_version_appends_to_its_metrics(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path, version=0)
    first.log_metrics({"loss": 1.0}, step=0)
    first.finalize("interrupted")
    resumed = CSVLogger(tmp_path, version=0)
    resumed.log_metrics({"loss": 0.5}, step=1)
    resumed.log_metrics({"accuracy": 0.75}, step=2)
    resumed.finalize("success")
    assert read_rows(first.metrics_file) == [
        ["step", "loss", "accuracy"],
        ["0", "1.0", ""],
        ["1", "0.5", ""],
        ["2", "", "0.75"],
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"version": -1}, "negative"),
        ({"version": 1.5}, "accepted: None"),
        ({"version": True}, "accepted: None"),
        ({"version": "a/b"}, "single folder name"),
        ({"name": None}, "must be a str"),
        ({"flush_every": 0}, "int >= 1"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(MisconfigurationError, match=message):
        CSVLogger(tmp_path, **arguments)
    assert not list(tmp_path.iterdir())


def test_bad_metric_values_and_names_are_refused(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    with pytest.raises(MisconfigurationError, match=r"'step'.*another name"):
        logger.log_metrics({"step": 1.0}, step=0)
    with pytest.raises(MisconfigurationError, match=r"'loss' has the value 'high'.*numbers"):
        logger.log_metrics({"loss": "high"}, step=0)
    with pytest.raises(MisconfigurationError, match="'weights'"):
        logger.log_metrics({"weights": torch.ones(3)}, step=0)


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class OptimizerConfig:
    lr: float
    betas: tuple[float, float]


def test_hparams_yaml_holds_sanitized_values(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    params = {
        "lr": torch.tensor(0.5),
        "layers": torch.tensor([3]),
        "steps": 100,
        "name": "tiny",
        "nothing": None,
        "flag": True,
        "path": tmp_path / "data",
        "shape": (2, 3),
        "color": Color.RED,
        "optimizer": OptimizerConfig(lr=0.1, betas=(0.9, 0.99)),
        "arguments": argparse.Namespace(batch_size=8),
        "activation": nn.ReLU,
        "model": nn.Linear(2, 1),
        "weights": torch.zeros(2, 2),
        "nested": {1: {"deep": torch.tensor(2)}},
    }
    logger.log_hyperparams(params)
    logger.log_hyperparams({"seed": 7})  # merged with the first call
    loaded = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert loaded == {
        "lr": 0.5,
        "layers": 3,
        "steps": 100,
        "name": "tiny",
        "nothing": None,
        "flag": True,
        "path": str(tmp_path / "data"),
        "shape": [2, 3],
        "color": "red",
        "optimizer": {"lr": 0.1, "betas": [0.9, 0.99]},
        "arguments": {"batch_size": 8},
        "activation": "torch.nn.modules.activation.ReLU",
        "model": repr(nn.Linear(2, 1)),
        "weights": repr(torch.zeros(2, 2)),
        "nested": {"1": {"deep": 2}},
        "seed": 7,
    }


def test_sanitize_stops_at_a_container_that_holds_itself() -> None:
    looping: list[object] = [1]
    looping.append(looping)
    assert sanitize(looping) == [1, "[1, [...]]"]


def test_a_row_taken_back_to_merge_is_not_kept_twice_on_resume(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, flush_every=10)
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_metrics({"loss": 0.5}, step=2)
    logger.save()
    logger.log_metrics({"val_loss": 0.75}, step=2)  # merges into the row on disk (buffered)
    logger.continue_run({}, step=2)
    logger.save()
    assert read_rows(logger.metrics_file) == [
        ["step", "loss", "val_loss"],
        ["1", "1.0", ""],
        ["2", "0.5", "0.75"],
    ]
