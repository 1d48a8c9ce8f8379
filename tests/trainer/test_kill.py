"""A training process killed with SIGKILL (at seeded batches, and in the middle of a save)
and started again continues from ``last``: no partial checkpoint is ever picked up, and the
final weights equal those of a run never interrupted, bit for bit. SIGTERM saves ``last``
and exits; the resumed fit is exact too."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ember import Callback, Trainer
from ember.callbacks import ModelCheckpoint
from ember.checkpoint.files import FILES, PAUSE_VARIABLE, TEMPORARY_PREFIX
from tests.distributed.launching import clean_environment
from tests.trainer.kill_script import Net, loader

SCRIPT = Path(__file__).with_name("kill_script.py")


def _start(root: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(root)],
        env=clean_environment(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    process = _start(root, **env)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _checkpoints(root: Path) -> list[Path]:
    folder = root / "checkpoints"
    return sorted(folder.iterdir()) if folder.exists() else []


def _assert_no_partial_checkpoint(root: Path) -> None:
    for entry in _checkpoints(root):
        if not entry.name.startswith(TEMPORARY_PREFIX):
            assert all((entry / name).is_file() for name in FILES), entry


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("reference")
    done = _run(root)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(root / "final.safetensors"))


def _assert_equal(expected: dict[str, torch.Tensor], root: Path) -> None:
    final = load_file(str(root / "final.safetensors"))
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(final[name], value), name


def test_killed_during_a_save_then_resumed(
    reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    marker = tmp_path / "paused"
    process = _start(tmp_path, **{PAUSE_VARIABLE: f"{marker}@3"})  # the third save
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    entries = _checkpoints(tmp_path)
    assert any(entry.name.startswith(TEMPORARY_PREFIX) for entry in entries)  # the half save
    _assert_no_partial_checkpoint(tmp_path)
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_equal(reference, tmp_path)
    assert not [e for e in _checkpoints(tmp_path) if e.name.startswith(TEMPORARY_PREFIX)]


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_at_a_seeded_batch_then_resumed(
    reference: dict[str, torch.Tensor], tmp_path: Path, seed: int
) -> None:
    at = random.Random(seed).randint(4, 28)  # 30 batches in the run
    done = _run(tmp_path, EMBER_TEST_KILL_AT=str(at))
    assert done.returncode == -signal.SIGKILL
    _assert_no_partial_checkpoint(tmp_path)
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_equal(reference, tmp_path)


class SendSignal(Callback):
    def __init__(self, at: int, signum: int) -> None:
        self.at = at
        self.signum = signum

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.state.total_batch_idx == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_last_and_exits_then_resume_is_exact(
    reference: dict[str, torch.Tensor], tmp_path: Path, signum: int
) -> None:
    import ember

    def trainer(*callbacks: Callback) -> Trainer:
        return Trainer(
            max_epochs=3,
            accumulate_grad_batches=2,
            callbacks=[ModelCheckpoint(every_n_train_steps=3, save_last=True), *callbacks],
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
        )

    ember.seed_everything(0)
    with pytest.raises(
        SystemExit, match=r"stopped by SIG(TERM|INT) at global step 6 .*last-step=6"
    ):
        trainer(SendSignal(11, signum)).fit(Net(), loader())  # mid-window: stops after 12
    assert [e.name for e in _checkpoints(tmp_path) if e.name.startswith("last")] == ["last-step=6"]
    meta = json.loads((tmp_path / "checkpoints" / "last-step=6" / "meta.json").read_text())
    assert meta["batch_idx"] == 2 and meta["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM)
    )
    ember.seed_everything(0)
    module = Net()
    trainer().fit(module, loader(), ckpt_path="last")
    for name, value in reference.items():
        assert torch.equal(module.state_dict()[name], value), name
