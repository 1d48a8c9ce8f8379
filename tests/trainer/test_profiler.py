"""Trainer(profiler=...): where each training step's time goes, read back from the printed
table, the loggers' files and the trace files."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ember import Callback, MisconfigurationError, Trainer
from ember.loggers import CSVLogger
from ember.trainer.profiling import (
    PART_LABELS,
    PART_NAMES,
    VALIDATION,
    PyTorchProfiler,
    SimpleProfiler,
)
from tests.distributed.launching import run_two_processes
from tests.helpers import TinyModule, bare_trainer_kwargs, loader, regression_data

BATCHES = 8  # per epoch: 64 samples, batch size 8


class SleepyStep(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


class SlowDataset(Dataset[Any]):
    def __init__(self) -> None:
        self.data = regression_data(64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        time.sleep(0.003)  # 24 ms per batch of 8
        return self.data[index]


class SleepAtBatchEnd(Callback):
    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(0.02)


class TrainingClock(Callback):
    """The wall time from on_train_start to on_train_end, as a user would measure it."""

    def on_train_start(self, *args: Any) -> None:
        self.began = time.perf_counter()

    def on_train_end(self, *args: Any) -> None:
        self.seconds = time.perf_counter() - self.began


def table_of(output: str) -> dict[str, tuple[float, float, float]]:
    """Each printed part: (mean ms per batch, total s, share)."""
    rows = {}
    for label in PART_LABELS:
        line = next(line for line in output.splitlines() if line.startswith(label))
        mean, total, share = re.findall(r"([\d.]+) (?:ms|s|%)", line.replace("%", " %"))
        rows[label] = (float(mean), float(total), float(share) / 100)
    return rows


def fit(
    module: Any, data: Any = None, callbacks: Any = None, val_loader: bool = False, **kwargs: Any
) -> Trainer:
    options = {"max_epochs": 1, "profiler": "simple", **bare_trainer_kwargs(), **kwargs}
    trainer = Trainer(accelerator="cpu", callbacks=callbacks, **options)
    trainer.fit(
        module,
        data if data is not None else loader(),
        loader(samples=16) if val_loader else None,
    )
    return trainer


def test_simple_prints_every_part_adding_up_to_the_training_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = TrainingClock()
    trainer = fit(SleepyStep(), callbacks=[clock], max_epochs=2)
    output = capsys.readouterr().out
    assert f"{2 * BATCHES} training batches" in output
    rows = table_of(output)
    assert set(rows) == set(PART_LABELS)
    shares = [share for _, _, share in rows.values()]
    assert all(0.0 <= share <= 1.0 for share in shares)
    assert sum(shares) == pytest.approx(1.0, abs=0.01)  # rounded to 0.1% each
    total = sum(seconds for _, seconds, _ in rows.values())
    assert total == pytest.approx(clock.seconds, rel=0.05)
    exact = trainer.profiler.shares()  # type: ignore[attr-defined]
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-9)
    # A 20 ms sleep in training_step: forward is where the time goes.
    assert rows["forward (training_step)"][2] > 0.8
    assert rows["forward (training_step)"][0] >= 20.0


def test_a_slow_dataset_shows_as_waiting_for_data(capsys: pytest.CaptureFixture[str]) -> None:
    fit(TinyModule(), DataLoader(SlowDataset(), batch_size=8))
    rows = table_of(capsys.readouterr().out)
    assert rows["waiting for data"][2] > 0.8
    assert rows["waiting for data"][0] >= 24.0


def test_a_slow_callback_shows_under_callbacks(capsys: pytest.CaptureFixture[str]) -> None:
    fit(TinyModule(), callbacks=[SleepAtBatchEnd()])
    rows = table_of(capsys.readouterr().out)
    assert rows["callbacks and logging"][2] > 0.8
    assert rows["forward (training_step)"][2] < 0.1


class SlowBackward(torch.autograd.Function):
    """The identity, whose backward takes 20 ms."""

    @staticmethod
    def forward(ctx: Any, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> Tensor:
        time.sleep(0.02)
        return gradient


class SlowSGD(torch.optim.SGD):
    def step(self, closure: Any = None) -> Any:
        time.sleep(0.02)
        return super().step(closure)


class SlowBackwardModule(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        loss = SlowBackward.apply(loss)
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)  # manual optimization: backward is still its own part
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        return loss


class SlowOptimizerModule(TinyModule):
    def configure_optimizers(self) -> Any:
        return SlowSGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("automatic", [True, False])
def test_a_slow_backward_shows_as_backward(
    automatic: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    module = SlowBackwardModule()
    module.automatic_optimization = automatic
    fit(module)
    rows = table_of(capsys.readouterr().out)
    assert rows["backward"][2] > 0.8
    assert rows["backward"][0] >= 20.0


def test_a_slow_optimizer_shows_as_the_optimizer_step(capsys: pytest.CaptureFixture[str]) -> None:
    # Two batches per step: the optimizer's 20 ms come once per two batches.
    fit(SlowOptimizerModule(), accumulate_grad_batches=2)
    rows = table_of(capsys.readouterr().out)
    assert rows["optimizer step"][2] > 0.8
    assert rows["optimizer step"][0] == pytest.approx(10.0, rel=0.3)


def test_validation_is_its_own_line_outside_the_step(capsys: pytest.CaptureFixture[str]) -> None:
    class SlowValidation(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            time.sleep(0.02)

    clock = TrainingClock()
    fit(SlowValidation(), loader(), callbacks=[clock], num_sanity_val_steps=1, val_loader=True)
    output = capsys.readouterr().out
    line = next(line for line in output.splitlines() if line.startswith("validation"))
    runs, seconds = re.findall(r"([\d.]+) (?:runs|s)", line)
    assert int(runs) == 2  # the sanity check and the end of the epoch
    assert float(seconds) >= 0.02 * 3  # 1 sanity batch + 2 batches
    rows = table_of(output)
    total = sum(seconds for _, seconds, _ in rows.values())
    # The step parts are the training time less the validation inside it (the table rounds
    # each part's seconds to 3 decimals: half a millisecond each at most).
    assert total < clock.seconds - 0.04 + 0.0005 * len(rows)


def test_shares_reach_the_loggers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = CSVLogger(tmp_path)
    fit(SleepyStep(), logger=logger)
    rows = table_of(capsys.readouterr().out)
    lines = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    written = {
        name: float(value)
        for line in lines[1:]
        for name, value in zip(header, line.split(","), strict=True)
        if name.startswith("profiler/") and value
    }
    assert set(written) == {f"profiler/{name}_share" for name in PART_NAMES}
    assert sum(written.values()) == pytest.approx(1.0, abs=1e-6)
    assert written["profiler/forward_share"] == pytest.approx(
        rows["forward (training_step)"][2], abs=0.001
    )


def test_pytorch_writes_a_bounded_chrome_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        profiler="pytorch",
        default_root_dir=tmp_path,
        **{**bare_trainer_kwargs(), "logger": CSVLogger(tmp_path)},
    )
    trainer.fit(TinyModule(), loader())
    traces = list((Path(trainer.log_dir) / "profiler").glob("*.pt.trace.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    events = trace["traceEvents"]
    assert events
    # Three active steps are recorded (the schedule), not the eight of the epoch.
    names = [event.get("name", "") for event in events]
    steps = {name for name in names if name.startswith("ProfilerStep#")}
    assert len(steps) == 3
    # Each part of the step is a named range, as in the "simple" table.
    assert {f"ember/{part}" for part in ("data", "forward", "backward", "optimizer")} <= set(names)
    assert str(trainer.log_dir) in capsys.readouterr().out


def test_a_profiler_object_is_accepted(tmp_path: Path) -> None:
    profiler = PyTorchProfiler(dirpath=tmp_path / "traces", wait=0, warmup=1, active=2)
    trainer = Trainer(accelerator="cpu", max_epochs=1, profiler=profiler, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader())
    assert list((tmp_path / "traces").glob("*.pt.trace.json"))
    simple = SimpleProfiler()
    fit(TinyModule(), profiler=simple)
    assert simple.batches == BATCHES


def test_disabled_prints_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit(TinyModule(), profiler=None, default_root_dir=tmp_path)
    assert "Profiler" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["advanced", True, 3])
def test_a_wrong_profiler_names_the_argument(value: Any) -> None:
    with pytest.raises(MisconfigurationError, match=r"profiler=.*'simple'.*'pytorch'"):
        Trainer(profiler=value)


def test_a_wrong_schedule_names_it() -> None:
    with pytest.raises(MisconfigurationError, match="active=0"):
        PyTorchProfiler(active=0)


def test_a_failed_fit_closes_the_trace_and_the_next_fit_records(tmp_path: Path) -> None:
    class Fails(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    profiler = PyTorchProfiler(dirpath=tmp_path, wait=0, warmup=1, active=3)
    options = {"max_epochs": 1, "profiler": profiler, **bare_trainer_kwargs()}
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(accelerator="cpu", **options).fit(Fails(), loader())
    # The profiler was stopped: the steps it recorded before the error are in a trace.
    traces = list(tmp_path.glob("*.pt.trace.json"))
    assert len(traces) == 1
    traces[0].unlink()
    Trainer(accelerator="cpu", **options).fit(TinyModule(), loader())
    assert len(list(tmp_path.glob("*.pt.trace.json"))) == 1


class FailsAt(TinyModule):
    """Raises in the hook (or step) it is given."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def on_fit_start(self) -> None:
        if self.where == "on_fit_start":
            raise RuntimeError("boom")

    def on_train_start(self) -> None:
        if self.where == "on_train_start":
            raise RuntimeError("boom")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.where == "sanity check":
            raise RuntimeError("boom")
        super().validation_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:Profiler won't be using warmup")
@pytest.mark.parametrize("where", ["on_fit_start", "sanity check", "on_train_start"])
def test_a_fit_failing_before_training_stops_the_torch_profiler(where: str, tmp_path: Path) -> None:
    # No wait nor warmup: torch.profiler records from the moment the fit starts it.
    profiler = PyTorchProfiler(dirpath=tmp_path, wait=0, warmup=0, active=2)
    trainer = Trainer(accelerator="cpu", max_epochs=1, profiler=profiler, **bare_trainer_kwargs())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(FailsAt(where), loader(), loader(samples=16))
    assert not torch.autograd.profiler._is_profiler_enabled  # left recording before the fix
    assert len(list(tmp_path.glob("rank0*.pt.trace.json"))) == 1  # stopped: trace written


@pytest.mark.filterwarnings("ignore:Profiler won't be using warmup")
def test_limit_train_batches_0_stops_the_torch_profiler(tmp_path: Path) -> None:
    profiler = PyTorchProfiler(dirpath=tmp_path, wait=0, warmup=0, active=2)
    options = {"max_epochs": 1, "limit_train_batches": 0, **bare_trainer_kwargs()}
    Trainer(accelerator="cpu", profiler=profiler, **options).fit(
        TinyModule(), loader(), loader(samples=16)
    )
    assert not torch.autograd.profiler._is_profiler_enabled
    assert len(list(tmp_path.glob("rank0*.pt.trace.json"))) == 1


def test_standalone_validate_and_test_leave_the_fit_table_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trainer = fit(TinyModule(), val_loader=True, max_epochs=2)
    profiler = trainer.profiler
    assert isinstance(profiler, SimpleProfiler)
    table = profiler.table()
    assert profiler.validations == 3  # the sanity check and one per epoch
    validation_seconds = profiler.totals[VALIDATION]
    trainer.validate(TinyModule(), loader(samples=16))
    trainer.test(TinyModule(), loader(samples=16))
    assert profiler.validations == 3
    assert profiler.totals[VALIDATION] == validation_seconds
    assert profiler.table() == table


TWO_RANKS_SCRIPT = """
import json, sys
from pathlib import Path
from ember import Trainer
from ember.loggers import CSVLogger
from tests.helpers import TinyModule, loader

root = Path(sys.argv[1])
trainer = Trainer(accelerator="cpu", devices=2, max_steps=6, profiler="pytorch",
                  default_root_dir=root, logger=CSVLogger(root), enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
trainer.fit(TinyModule(), loader())
(root / f"trace_dir{trainer.global_rank}.json").write_text(json.dumps(
    str(trainer.profiler.trace_dir)))
"""


def test_two_processes_write_their_traces_into_rank_zeros_one_folder(tmp_path: Path) -> None:
    """``profiler="pytorch"`` under ``devices=2``: rank 0 alone reads its loggers for the
    folder (rank 1 reading a CSVLogger's folder would claim ``version_1``); each rank writes
    its own ``rank<N>`` trace into that one folder."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS_SCRIPT)
    root = tmp_path / "root"
    run_two_processes(script, str(root))
    folders = {json.loads((root / f"trace_dir{rank}.json").read_text()) for rank in (0, 1)}
    assert folders == {str(root / "ember" / "version_0" / "profiler")}
    assert sorted(path.name for path in (root / "ember").iterdir()) == ["version_0"]
    traces = sorted(path.name.split(".")[0] for path in Path(folders.pop()).iterdir())
    assert traces == ["rank0", "rank1"]


@pytest.mark.gpu
def test_simple_on_cuda_charges_kernels_to_the_part_that_launched_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class HeavyForward(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            square = torch.randn(4096, 4096, device=self.device)
            for _ in range(20):  # queued kernels: seconds of device work, microseconds of host
                square = torch.tanh(square @ square)
            return super().training_step(batch, batch_idx) + 0 * square.mean()

    clock = TrainingClock()
    options = {"max_epochs": 1, "profiler": "simple", **bare_trainer_kwargs()}
    Trainer(accelerator="cuda", callbacks=[clock], **options).fit(HeavyForward(), loader())
    rows = table_of(capsys.readouterr().out)
    assert rows["forward (training_step)"][2] > 0.8  # not the optimizer step's host read
    total = sum(seconds for _, seconds, _ in rows.values())
    assert total == pytest.approx(clock.seconds, rel=0.05)
