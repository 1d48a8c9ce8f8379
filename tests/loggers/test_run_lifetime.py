"""Issue 9: one run per logger object in a sweep (W&B, TensorBoard statuses), hyperparameters
on disk as soon as they are logged and on every stage, steps that only increase, file modes."""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ember import Trainer
from ember.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tests.helpers import MemoryLogger, TinyModule, loader
from tests.loggers.readback import csv_values, hparams_tab, wandb_run

pytest.importorskip("tensorboard")
wandb = pytest.importorskip("wandb")


class Swept(TinyModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()


def quiet_trainer(**kwargs: Any) -> Trainer:
    return Trainer(
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=2,
        **kwargs,
    )


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


def assert_points(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected])


# --- 1. a sweep in one process: one run per logger, each with its real status ----------------


def test_each_wandb_logger_of_a_sweep_gets_a_run_of_its_own(offline_wandb: Path) -> None:
    loggers = []
    for lr in (0.1, 0.01, 0.001):
        logger = WandbLogger(project="sweep", save_dir=offline_wandb)
        quiet_trainer(max_steps=4, logger=logger).fit(Swept(lr), loader())
        loggers.append(logger)
    loggers[-1].finalize("success")
    ids = [logger.version for logger in loggers]
    assert len(set(ids)) == 3, ids
    runs = {
        run.run_id: run for run in map(wandb_run, (offline_wandb / "wandb").glob("offline-run-*"))
    }
    assert sorted(runs) == sorted(ids)
    for logger, lr in zip(loggers, (0.1, 0.01, 0.001), strict=True):
        run = runs[logger.version]
        assert run.config["lr"] == lr
        assert [step for step, _ in run.values()["train_loss"]] == [2, 4]
        assert run.exit_code == 0  # the first two were finished when the next one started


def test_a_run_the_user_started_is_used_not_finished(offline_wandb: Path) -> None:
    mine = wandb.init(project="mine", dir=str(offline_wandb))
    try:
        first, second = (WandbLogger(save_dir=offline_wandb) for _ in range(2))
        first.log_metrics({"a": 1.0}, step=0)
        second.log_metrics({"b": 1.0}, step=1)
        assert first.experiment is second.experiment is mine
        quiet_trainer(max_steps=2, logger=first).fit(Swept(), loader())
        del first, second
        gc.collect()  # a collected logger does not finish the user's run either
        assert wandb.run is mine
    finally:
        mine.finish()


def test_a_collected_tensorboard_logger_records_its_status(tmp_path: Path) -> None:
    def trial(lr: float) -> None:
        logger = TensorBoardLogger(tmp_path)
        quiet_trainer(max_steps=4, logger=logger).fit(Swept(lr), loader())

    for lr in (0.1, 0.01):
        trial(lr)
        gc.collect()  # the trainer and the module hold each other: collected here
    tab = hparams_tab(tmp_path)
    assert sorted(tab) == ["ember/version_0", "ember/version_1"]
    assert [tab[run]["hparams"]["lr"] for run in sorted(tab)] == pytest.approx([0.1, 0.01])
    assert {run["status"] for run in tab.values()} == {"STATUS_SUCCESS"}


# --- 3. TensorBoard hyperparameters are on disk when logged ------------------------------------


def test_tensorboard_hparams_are_in_the_tab_before_any_save(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.5, "model": {"width": 8}})
    # No save(), no finalize(): a run that crashes now still shows them.
    (tab,) = hparams_tab(tmp_path).values()
    assert tab["hparams"] == {"lr": 0.5, "model/width": 8}
    assert tab["status"] == "STATUS_UNKNOWN"
    logger.log_hyperparams({"extra": 1})  # later ones reach hparams.yaml only
    logger.finalize("success")
    (tab,) = hparams_tab(tmp_path).values()
    assert tab["hparams"] == {"lr": 0.5, "model/width": 8}
    assert tab["status"] == "STATUS_SUCCESS"
    assert "extra: 1" in (Path(logger.log_dir) / "hparams.yaml").read_text()


# --- 6. files written atomically respect the umask -------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_metrics_and_hparams_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        logger = CSVLogger(tmp_path)
        logger.log_hyperparams({"lr": 0.1})
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.log_metrics({"new_name": 1.0}, step=1)  # the header grows: rewritten atomically
        logger.finalize("success")
    finally:
        os.umask(previous)
    folder = Path(logger.log_dir)
    assert csv_values(folder / "metrics.csv")["new_name"] == [(1, 1.0)]
    for name in ("metrics.csv", "hparams.yaml"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name


# --- 2. steps within one run only increase ----------------------------------------------------


def test_a_second_fresh_fit_goes_on_after_the_steps_of_the_first(offline_wandb: Path) -> None:
    csv_logger = CSVLogger(offline_wandb / "logs")
    wandb_logger = WandbLogger(project="p", save_dir=offline_wandb)
    memory = MemoryLogger()
    trainer = quiet_trainer(max_steps=4, logger=[csv_logger, wandb_logger, memory])
    trainer.fit(Swept(0.1), loader())
    first = memory.values("train_loss")
    trainer.fit(Swept(0.01), loader())  # starts again at step 0
    assert trainer.global_step == 4
    trainer.test(Swept(0.01), loader())  # at the second fit's step 4 too: 8 in the run
    second = memory.values("train_loss")[len(first) :]
    assert [step for step, _ in first] == [2, 4]
    assert [step for step, _ in second] == [6, 8]
    assert [step for step, _ in memory.values("test_loss")] == [8]
    wandb_logger.finalize("success")
    assert_points(
        csv_values(Path(csv_logger.log_dir) / "metrics.csv")["train_loss"], first + second
    )
    (run_folder,) = (offline_wandb / "wandb").glob("offline-run-*")
    history = wandb_run(run_folder).values()
    # W&B drops a step lower than one it has: every value of both fits arrived.
    assert_points(history["train_loss"], first + second)
    assert_points(history["test_loss"], memory.values("test_loss"))


def test_an_override_calling_super_is_offset_once(tmp_path: Path) -> None:
    class Scaled(CSVLogger):
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            super().log_metrics({f"{k}_x2": 2 * v for k, v in metrics.items()}, step=step)

    logger = Scaled(tmp_path)
    trainer = quiet_trainer(max_steps=4, logger=logger)
    trainer.fit(Swept(), loader())
    trainer.fit(Swept(), loader())
    rows = csv_values(Path(logger.log_dir) / "metrics.csv")["train_loss_x2"]
    assert [step for step, _ in rows] == [2, 4, 6, 8]


def test_a_fit_resumed_from_a_later_fit_keeps_its_offset(tmp_path: Path) -> None:
    memory = MemoryLogger()
    trainer = quiet_trainer(max_steps=4, logger=memory, default_root_dir=tmp_path)
    trainer.fit(Swept(), loader())
    module = Swept()
    trainer.fit(module, loader())  # logged at 6, 8
    trainer.save_checkpoint(tmp_path / "at4")
    resumed = MemoryLogger()  # a new process's logger, say
    quiet_trainer(max_steps=8, logger=resumed, default_root_dir=tmp_path).fit(
        Swept(), loader(), ckpt_path=tmp_path / "at4"
    )
    # The checkpoint's step 4 is the run's 8: the resumed fit goes on at 10, 12.
    assert [step for step, _ in resumed.values("train_loss")] == [10, 12]


# --- 4. every stage logs the hyperparameters, once per run -------------------------------------


def test_test_from_a_checkpoint_logs_the_hyperparameters(offline_wandb: Path) -> None:
    trainer = quiet_trainer(max_steps=2, logger=False, default_root_dir=offline_wandb)
    trainer.fit(Swept(0.02), loader())
    trainer.save_checkpoint(offline_wandb / "trained")
    calls: list[dict[str, Any]] = []

    class Calls(MemoryLogger):
        def log_hyperparams(self, params: dict[str, Any]) -> None:
            calls.append(dict(params))

    wandb_logger, memory = WandbLogger(save_dir=offline_wandb), Calls()
    tester = quiet_trainer(logger=[wandb_logger, memory])
    module = Swept(0.02)
    tester.test(module, loader(), ckpt_path=offline_wandb / "trained")
    tester.validate(module, loader())  # the same hyperparameters: not logged again
    module.hparams["lr"] = 0.5
    tester.predict(module, loader())  # changed: logged again
    assert calls == [{"lr": 0.02}, {"lr": 0.5}]
    wandb_logger.finalize("success")
    (run_folder,) = (offline_wandb / "wandb").glob("offline-run-*")
    assert wandb_run(run_folder).config == {"lr": 0.5}
