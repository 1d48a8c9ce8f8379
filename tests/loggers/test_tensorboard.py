"""TensorBoardLogger: event files read back with TensorBoard's own reader, lazy imports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ember.loggers.tensorboard import TensorBoardLogger, tensorboard_available
from tests.loggers.readback import hparams_tab

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

SOURCE_ROOT = Path(__file__).resolve().parents[2] / "src"
INSTALL_HINT = re.escape('pip install "ember[tensorboard]"')


def read_events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def hparams_plugin_data(log_dir: str) -> dict[str, HParamsPluginData]:
    """The latest content of each HParams summary tag in ``log_dir``'s event files."""
    contents = read_events(log_dir).PluginTagToContent("hparams")
    return {tag: HParamsPluginData.FromString(content) for tag, content in contents.items()}


def test_scalars_are_written_under_their_names_and_steps(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.5, "lr": 0.1}, step=0)
    logger.log_metrics({"train/loss": 0.75}, step=4)
    logger.log_metrics({"val_accuracy": 0.5}, step=4)
    logger.finalize("success")

    assert logger.log_dir == str(tmp_path / "ember" / "version_0")
    events = read_events(logger.log_dir)
    assert set(events.Tags()["scalars"]) == {"train/loss", "lr", "val_accuracy"}
    loss = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert loss == [(0, 1.5), (4, 0.75)]
    assert [(event.step, event.value) for event in events.Scalars("val_accuracy")] == [(4, 0.5)]


def test_hyperparameters_reach_the_hparams_tab_and_yaml(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", version="first")
    logger.log_hyperparams(
        {"lr": torch.tensor(0.25), "optimizer": {"name": "adam", "betas": (0.9, 0.99)}, "amp": True}
    )
    logger.log_hyperparams({"later": 1})
    logger.finalize("success")

    assert yaml.safe_load((tmp_path / "run" / "first" / "hparams.yaml").read_text()) == {
        "lr": 0.25,
        "optimizer": {"name": "adam", "betas": [0.9, 0.99]},
        "amp": True,
        "later": 1,
    }
    plugin_data = hparams_plugin_data(logger.log_dir)
    # The session start holds the first call's hyperparameters (TensorBoard keeps the first).
    values = plugin_data["_hparams_/session_start_info"].session_start_info.hparams
    assert values["lr"].number_value == 0.25
    assert values["optimizer/name"].string_value == "adam"
    assert values["optimizer/betas"].string_value == "[0.9, 0.99]"
    assert values["amp"].string_value == "True"
    assert "later" not in values
    # No experiment summary: TensorBoard builds the tab from every run's session start.
    assert "_hparams_/experiment" not in plugin_data
    end = plugin_data["_hparams_/session_end_info"].session_end_info
    assert end.status == api_pb2.Status.Value("STATUS_SUCCESS")


def test_the_hparams_tab_shows_each_run_with_its_final_metrics(tmp_path: Path) -> None:
    for lr, status in ((0.1, "success"), (0.2, "failed")):
        logger = TensorBoardLogger(tmp_path)
        logger.log_hyperparams({"lr": lr, "optimizer": {"name": "adam"}})
        logger.log_metrics({"loss": 1.0, "lr_now": lr}, step=0)
        logger.log_metrics({"loss": lr / 2}, step=5)
        logger.log_metrics({"val/accuracy": 1 - lr}, step=5)
        logger.finalize(status)
    runs = hparams_tab(tmp_path)
    assert sorted(runs) == ["ember/version_0", "ember/version_1"]
    for version, lr in (("ember/version_0", 0.1), ("ember/version_1", 0.2)):
        assert runs[version]["hparams"] == {"lr": pytest.approx(lr), "optimizer/name": "adam"}
        assert runs[version]["metrics"] == pytest.approx(
            {"loss": lr / 2, "lr_now": lr, "val/accuracy": 1 - lr}
        )
    # A failure is not written: the folder may be resumed later and end in a success.
    assert runs["ember/version_0"]["status"] == "STATUS_SUCCESS"
    assert runs["ember/version_1"]["status"] == "STATUS_UNKNOWN"


def test_versions_and_lazy_folders_match_the_csv_logger(tmp_path: Path) -> None:
    first = TensorBoardLogger(tmp_path / "logs")
    assert not (tmp_path / "logs").exists()
    assert first.name == "ember"
    assert first.version == 0
    assert TensorBoardLogger(tmp_path / "logs").version == 1
    assert TensorBoardLogger(tmp_path / "logs", version=5).log_dir == str(
        tmp_path / "logs" / "ember" / "version_5"
    )


def test_experiment_is_the_summary_writer_and_reopens_after_finalize(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    logger = TensorBoardLogger(tmp_path)
    writer = logger.experiment
    assert isinstance(writer, SummaryWriter)
    assert logger.experiment is writer
    logger.save()
    logger.finalize("success")
    logger.log_metrics({"loss": 1.0}, step=9)  # after finalize: a new writer, same folder
    logger.finalize("success")
    assert [event.step for event in read_events(logger.log_dir).Scalars("loss")] == [9]


def test_missing_tensorboard_is_reported_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert not tensorboard_available()
    with pytest.raises(ModuleNotFoundError, match=INSTALL_HINT) as caught:
        TensorBoardLogger(tmp_path)
    assert caught.value.name == "tensorboard"


def test_missing_tensorboard_is_reported_at_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = TensorBoardLogger(tmp_path)
    # Uninstalled between construction and first write; torch.utils.tensorboard may already
    # be imported by another test, so block it too.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ModuleNotFoundError, match=INSTALL_HINT):
        logger.log_metrics({"loss": 1.0}, step=0)


def test_importing_the_loggers_imports_neither_tensorboard_nor_wandb() -> None:
    code = (
        "import sys, ember.loggers; "
        "assert 'tensorboard' not in sys.modules, 'tensorboard was imported'; "
        "assert 'wandb' not in sys.modules, 'wandb was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SOURCE_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_tensors_become_scalars_and_other_values_are_refused(tmp_path: Path) -> None:
    from ember import MisconfigurationError

    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"loss": torch.tensor(0.5), "count": 3}, step=1)
    with pytest.raises(MisconfigurationError, match=r"'name'.*'adam'.*numbers"):
        logger.log_metrics({"name": "adam"}, step=2)
    logger.finalize("success")
    events = read_events(logger.log_dir)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("count")] == [(1, 3.0)]
