"""Accelerate-style tracking (``log_with``, ``init_trackers``, ``log``, ``get_tracker``,
``end_training``) on ember's loggers: what a hand-written loop logs is read back from the
files the trackers wrote."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from ember import Accelerator, MisconfigurationError
from ember.loggers import CSVLogger, Logger, TensorBoardLogger


def _train(accelerator: Accelerator, steps: int = 3) -> list[float]:
    """A tiny loop that logs its loss (a 0-dim tensor) at steps 0, 1, 2; returns the losses."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    losses = []
    for step in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"loss": loss.detach(), "lr": 0.1}, step=step)
        losses.append(loss.item())
    return losses


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_csv_tracker_writes_the_loop_metrics_and_config(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, log_with="csv", project_dir=tmp_path)
    accelerator.init_trackers("project", config={"lr": 0.1, "layers": [2, 1]})
    losses = _train(accelerator)
    accelerator.end_training()
    folder = tmp_path / "project"
    rows = _csv_rows(folder / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    assert [float(row["loss"]) for row in rows] == pytest.approx(losses)
    assert yaml.safe_load((folder / "hparams.yaml").read_text()) == {"lr": 0.1, "layers": [2, 1]}
    assert [tracker.name for tracker in accelerator.trackers] == ["csv"]
    assert accelerator.get_tracker("csv").logger.log_dir == str(folder)


def test_tensorboard_tracker_writes_event_files_directly_in_the_project_folder(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorboard")
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=tmp_path)
    accelerator.init_trackers("project", config={"lr": 0.1})
    losses = _train(accelerator)
    accelerator.end_training()
    folder = tmp_path / "project"
    assert any(path.name.startswith("events.out.tfevents") for path in folder.iterdir())
    assert not any(path.is_dir() for path in folder.iterdir())  # no version_N folder
    scalars = _scalars(folder)
    assert [step for step, _ in scalars["loss"]] == [0, 1, 2]
    assert [value for _, value in scalars["loss"]] == pytest.approx(losses)
    assert yaml.safe_load((folder / "hparams.yaml").read_text()) == {"lr": 0.1}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 0.1


def test_step_none_continues_from_the_last_step(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, log_with="csv", project_dir=tmp_path)
    accelerator.init_trackers("steps")
    accelerator.log({"a": 1.0})  # step 0
    accelerator.log({"a": 2.0})  # step 1
    accelerator.log({"a": 3.0}, step=10)
    accelerator.log({"a": 4.0})  # step 11
    accelerator.log({"flag": True, "count": torch.tensor([7])})  # step 12
    accelerator.end_training()
    rows = _csv_rows(tmp_path / "steps" / "metrics.csv")
    assert [(row["step"], row["a"]) for row in rows] == [
        ("0", "1.0"),
        ("1", "2.0"),
        ("10", "3.0"),
        ("11", "4.0"),
        ("12", ""),
    ]
    assert (rows[-1]["flag"], rows[-1]["count"]) == ("1", "7")


def test_all_takes_every_installed_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # hidden: "all" must leave it out
    expected = ["tensorboard", "csv"] if _installed("tensorboard") else ["csv"]
    accelerator = Accelerator(cpu=True, log_with="all", project_dir=tmp_path)
    accelerator.init_trackers("everything")
    accelerator.log({"x": 1.5}, step=3)
    accelerator.end_training()
    assert sorted(tracker.name for tracker in accelerator.trackers) == sorted(expected)
    assert _csv_rows(tmp_path / "everything" / "metrics.csv") == [{"step": "3", "x": "1.5"}]
    if "tensorboard" in expected:
        assert _scalars(tmp_path / "everything") == {"x": [(3, 1.5)]}


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def test_a_named_tracker_whose_package_is_missing_names_the_pip_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install \"ember\[tensorboard\]\""):
        Accelerator(cpu=True, log_with=["csv", "tensorboard"])


def test_logger_objects_and_names_mix_and_get_tracker_unwraps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    own = CSVLogger(tmp_path / "own", name="run")
    accelerator = Accelerator(cpu=True, log_with=["tensorboard", own], project_dir=tmp_path)
    accelerator.init_trackers("mixed", config={"seed": 3})
    accelerator.log({"loss": torch.tensor(0.5)}, step=0)
    from torch.utils.tensorboard import SummaryWriter

    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    assert isinstance(writer, SummaryWriter)
    assert accelerator.get_tracker("tensorboard").tracker is writer
    assert isinstance(accelerator.get_tracker("tensorboard").logger, TensorBoardLogger)
    writer.add_scalar("extra", 2.0, global_step=1)  # the writer is the real one
    assert accelerator.get_tracker("csv", unwrap=True) is own
    with pytest.raises(MisconfigurationError, match=r"'wandb'.*\['tensorboard', 'csv'\]"):
        accelerator.get_tracker("wandb")
    accelerator.end_training()
    accelerator.end_training()  # twice: nothing more happens, no error
    assert _scalars(tmp_path / "mixed") == {"loss": [(0, 0.5)], "extra": [(1, 2.0)]}
    rows = _csv_rows(Path(own.log_dir) / "metrics.csv")
    assert rows == [{"step": "0", "loss": "0.5"}]
    assert yaml.safe_load((Path(own.log_dir) / "hparams.yaml").read_text()) == {"seed": 3}


def test_end_training_finishes_the_trackers_and_log_then_warns_once(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, log_with="csv", project_dir=tmp_path)
    accelerator.init_trackers("ended")
    accelerator.log({"x": 1.0})
    accelerator.end_training()  # the buffered row is written now
    assert _csv_rows(tmp_path / "ended" / "metrics.csv") == [{"step": "0", "x": "1.0"}]
    with pytest.warns(UserWarning, match=r"no trackers running.*init_trackers"):
        accelerator.log({"x": 2.0})  # nothing to write to: recorded nowhere, as in Accelerate
    accelerator.init_trackers("ended")  # a rerun appends to the same file
    accelerator.log({"x": 3.0})
    accelerator.end_training()
    assert [row["x"] for row in _csv_rows(tmp_path / "ended" / "metrics.csv")] == ["1.0", "3.0"]


def test_without_log_with_log_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    accelerator = Accelerator(cpu=True)
    accelerator.log({"x": 1.0})
    accelerator.end_training()
    accelerator.init_trackers("nothing", config={"lr": 1.0})  # as in Accelerate: nothing
    accelerator.log({"x": 1.0})
    assert accelerator.trackers == []
    assert list(tmp_path.iterdir()) == []


def test_log_and_get_tracker_before_init_trackers_behave_as_in_accelerate(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """What a process that started no trackers sees (the diffusers scripts call
    ``init_trackers`` on the main process only): ``log`` records nothing (warning once, on
    the main process, since the values are lost), ``get_tracker`` returns a blank tracker."""
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=tmp_path)
    for step in range(3):
        accelerator.log({"loss": torch.tensor(0.5)}, step=step)
    warned = [str(w.message) for w in recwarn if "no trackers running" in str(w.message)]
    assert len(warned) == 1 and "['tensorboard']" in warned[0]
    blank = accelerator.get_tracker("tensorboard")
    assert blank.logger is None and blank.name == "tensorboard"
    blank.log({"x": 1.0}, step=0)
    blank.tracker.add_scalar("x", 1.0)  # accepts any call
    accelerator.get_tracker("tensorboard", unwrap=True).add_histogram("w", torch.ones(2))
    assert list(tmp_path.iterdir()) == []  # nothing was created
    accelerator.init_trackers("late")  # then the same calls write
    accelerator.log({"loss": 0.25}, step=3)
    accelerator.end_training()
    assert _scalars(tmp_path / "late") == {"loss": [(3, 0.25)]}


def test_project_dir_defaults_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    accelerator = Accelerator(cpu=True, log_with="csv")
    accelerator.init_trackers("here")
    accelerator.log({"x": 1.0})
    accelerator.end_training()
    assert (tmp_path / "here" / "metrics.csv").is_file()


@pytest.mark.parametrize(
    ("log_with", "match"),
    [
        ("tensorbord", r"log_with='tensorbord'.*'tensorbord' is not a tracker.*\"csv\""),
        (["csv", 3], r"3 is not a tracker.*a Logger object"),
        (CSVLogger, r"is not a tracker.*accepted"),
    ],
)
def test_bad_log_with_is_refused(log_with: Any, match: str) -> None:
    with pytest.raises(MisconfigurationError, match=match):
        Accelerator(cpu=True, log_with=log_with)


def test_bad_values_steps_and_arguments_are_refused(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, log_with="csv", project_dir=tmp_path)
    with pytest.warns(UserWarning, match="init_trackers"):
        accelerator.log({"x": 1.0})  # not started yet: nothing recorded
    with pytest.raises(MisconfigurationError, match="project_name"):
        accelerator.init_trackers("")
    with pytest.raises(MisconfigurationError, match=r"init_kwargs.*\['wandb'\].*\['csv'\]"):
        accelerator.init_trackers("p", init_kwargs={"wandb": {}})
    with pytest.raises(MisconfigurationError, match="config"):
        accelerator.init_trackers("p", config=[1, 2])  # type: ignore[arg-type]
    accelerator.init_trackers("p")
    with pytest.raises(MisconfigurationError, match="already called"):
        accelerator.init_trackers("p")
    with pytest.raises(MisconfigurationError, match=r"'weights' = a shape \(2, 2\) value"):
        accelerator.log({"weights": torch.ones(2, 2)})
    with pytest.raises(MisconfigurationError, match=r"'name' = a str value"):
        accelerator.log({"name": "text"})
    with pytest.raises(MisconfigurationError, match=r"step=-1"):
        accelerator.log({"x": 1.0}, step=-1)
    with pytest.raises(MisconfigurationError, match=r"step=1.5"):
        accelerator.log({"x": 1.0}, step=1.5)  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationError, match='only the "tensorboard" and "wandb"'):
        accelerator.log({"x": 1.0}, log_kwargs={"csv": {"commit": False}})
    accelerator.end_training()
    assert not (tmp_path / "p" / "metrics.csv").exists()  # nothing bad was written


def test_wandb_tracker_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    accelerator = Accelerator(cpu=True, log_with="wandb", project_dir=tmp_path / "runs")
    accelerator.init_trackers(
        "wandb_project", config={"lr": 0.1}, init_kwargs={"wandb": {"name": "first"}}
    )
    run = accelerator.get_tracker("wandb", unwrap=True)
    assert run.project == "wandb_project" and run.name == "first"
    assert dict(run.config) == {"lr": 0.1}
    accelerator.log({"loss": torch.tensor(2.0)}, step=0)
    accelerator.log({"loss": 1.0})  # step 1
    accelerator.log({"acc": 0.5}, log_kwargs={"wandb": {"commit": False}})  # step 2
    summary = dict(run.summary)
    accelerator.end_training()
    assert summary["loss"] == 1.0
    assert Path(run.dir).is_relative_to(tmp_path / "runs" / "wandb")  # no dir, no WANDB_DIR
    from tests.loggers.readback import wandb_run

    # Read once W&B's service process has written the file (it does after finish returns).
    history = wandb_run(Path(run.dir).parent).values()
    assert "loss" in history and "acc" in history

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))  # wandb's variable wins
    accelerator.init_trackers("wandb_project")
    run = accelerator.get_tracker("wandb", unwrap=True)
    accelerator.end_training()
    assert Path(run.dir).is_relative_to(tmp_path / "wandb_dir" / "wandb")


def test_custom_loggers_are_named_by_class_and_tensorboard_takes_log_kwargs(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorboard")

    class MemoryLogger(Logger):
        name = "memory"
        version = 0

        def __init__(self) -> None:
            self.rows: list[tuple[int, dict[str, float]]] = []
            self.statuses: list[str] = []

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.rows.append((step, metrics))

        def log_hyperparams(self, params: dict[str, Any]) -> None:
            pass

        def finalize(self, status: str) -> None:
            self.statuses.append(status)

    memory = MemoryLogger()
    board = TensorBoardLogger(tmp_path, name="", version="custom")  # an object takes them too
    accelerator = Accelerator(cpu=True, log_with=[board, memory])
    accelerator.init_trackers("custom")
    assert accelerator.get_tracker("MemoryLogger", unwrap=True) is memory
    accelerator.log({"x": torch.tensor(4.0)}, step=2)
    with pytest.raises(MisconfigurationError, match="log_kwargs"):
        accelerator.log({"x": 1.0}, log_kwargs={"MemoryLogger": {"walltime": 1.0}})
    accelerator.log({"y": 1.0}, step=5, log_kwargs={"tensorboard": {"walltime": 1234.0}})
    accelerator.end_training()
    accelerator.end_training()
    assert memory.rows == [(2, {"x": 4.0}), (5, {"y": 1.0})]
    assert memory.statuses == ["success"]  # finished once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "custom"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("x")] == [2]  # the refused call: none
    (event,) = accumulator.Scalars("y")
    assert (event.step, event.value, event.wall_time) == (5, 1.0, 1234.0)
