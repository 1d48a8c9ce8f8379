"""WandbLogger: a real offline run end to end, the calls it makes, and the missing-package error."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.loggers.wandb import WandbLogger

wandb = pytest.importorskip("wandb")

INSTALL_HINT = re.escape('pip install "ember[wandb]"')


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B kept off the network and inside ``tmp_path``."""
    settings = tmp_path / "wandb_settings"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(settings))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_an_offline_run_records_metrics_and_config(offline_wandb: Path) -> None:
    save_dir = offline_wandb / "runs"  # missing: the logger creates it
    logger = WandbLogger(project="ember-tests", name="tiny", save_dir=save_dir)
    assert not save_dir.exists(), "the run must start on first use, not on construction"

    logger.log_hyperparams({"lr": torch.tensor(0.5), "data": {"path": save_dir / "data"}})
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.log_metrics({"accuracy": 0.75}, step=1)  # same step: the same row
    logger.log_metrics({"loss": 0.25}, step=2)

    run = logger.experiment
    assert logger.name == "tiny"
    assert logger.version == run.id
    run_folder = Path(logger.log_dir).parent
    assert run_folder.parent == save_dir / "wandb"
    assert run_folder.name.startswith("offline-run-")
    assert dict(run.config) == {"lr": 0.5, "data": {"path": str(save_dir / "data")}}
    # The summary holds the last committed row: step 1, with both of its calls merged.
    summary = dict(run.summary)
    assert (summary["_step"], summary["loss"], summary["accuracy"]) == (1, 0.5, 0.75)

    logger.finalize("success")
    assert list(run_folder.glob("run-*.wandb")), "the offline run's data file is missing"
    logger.finalize("success")  # a second finalize has no run left to finish


class FakeRun:
    """Records what the logger asks of a wandb run."""

    def __init__(self) -> None:
        self.id = "abc123"
        self.name = ""
        self.dir = "/somewhere/files"
        self.logged: list[tuple[dict[str, float], int]] = []
        self.config = FakeConfig()
        self.exit_codes: list[int] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((metrics, step))

    def finish(self, exit_code: int) -> None:
        self.exit_codes.append(exit_code)


class FakeConfig:
    def __init__(self) -> None:
        self.updates: list[tuple[dict[str, Any], bool]] = []

    def update(self, params: dict[str, Any], allow_val_change: bool) -> None:
        self.updates.append((params, allow_val_change))


@pytest.mark.parametrize(
    ("offline", "status", "mode", "exit_code"),
    [(True, "success", "offline", 0), (False, "failed", None, 1), (False, "interrupted", None, 1)],
)
def test_init_arguments_and_exit_codes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    offline: bool,
    status: str,
    mode: str | None,
    exit_code: int,
) -> None:
    calls: list[dict[str, Any]] = []
    run = FakeRun()

    def fake_init(**kwargs: Any) -> FakeRun:
        calls.append(kwargs)
        return run

    monkeypatch.setattr(wandb, "run", None)
    monkeypatch.setattr(wandb, "init", fake_init)
    logger = WandbLogger(
        project="p", save_dir=tmp_path / "out", offline=offline, tags=["a"], entity="team"
    )
    logger.log_metrics({"loss": 2.0}, step=3)
    logger.log_hyperparams({"model": torch.nn.Identity()})
    assert calls == [
        {
            "project": "p",
            "name": None,
            "dir": str(tmp_path / "out"),
            "mode": mode,
            "tags": ["a"],
            "entity": "team",
        }
    ]
    assert (tmp_path / "out").is_dir()
    assert run.logged == [({"loss": 2.0}, 3)]
    assert run.config.updates == [({"model": "Identity()"}, True)]
    assert (logger.name, logger.version, logger.log_dir) == ("abc123", "abc123", run.dir)
    logger.finalize(status)
    assert run.exit_codes == [exit_code]
    assert len(calls) == 1


def test_an_active_run_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    run = FakeRun()
    monkeypatch.setattr(wandb, "run", run)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: pytest.fail("wandb.init was called"))
    assert WandbLogger().experiment is run


def test_finalize_without_a_run_starts_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wandb, "init", lambda **kwargs: pytest.fail("wandb.init was called"))
    WandbLogger().finalize("success")


def test_missing_wandb_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match=INSTALL_HINT) as caught:
        WandbLogger(save_dir=tmp_path)
    assert caught.value.name == "wandb"


def test_missing_wandb_at_first_use_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = WandbLogger(save_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match=INSTALL_HINT):
        logger.log_metrics({"loss": 1.0}, step=0)
