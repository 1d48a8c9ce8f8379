"""Faults in a DDP fit of two real processes (gloo on 127.0.0.1), ``fault_scenarios.py``:
SIGTERM on one rank saves ``last`` on every rank and exits non-zero, and the resumed fit is
exact; a rank killed with SIGKILL under ``ember launch --max_restarts 1`` restarts the group,
which continues from ``last`` to the weights of a fit never interrupted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ember.checkpoint.files import FILES, TEMPORARY_PREFIX
from tests.distributed.launching import clean_environment, free_port

SCRIPT = Path(__file__).with_name("fault_scenarios.py")


def _torchrun(*arguments: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *arguments,
    ]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env=clean_environment(EMBER_COLLECTIVE_TIMEOUT="60"),
        capture_output=True,
        text=True,
        timeout=240,
    )


def _complete(folder: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if not entry.name.startswith(TEMPORARY_PREFIX)
        and all((entry / name).is_file() for name in FILES)
    )


def test_sigterm_on_one_rank_saves_last_and_the_resume_is_exact(tmp_path: Path) -> None:
    stopped = _run(_torchrun(str(SCRIPT), str(tmp_path), "sigterm"))
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, output[-3000:]
    # Rank 1 got the signal after batch 7 (mid-window); the ranks agreed one step boundary
    # after the next one: step 5.
    assert output.count("stopped by SIGTERM at global step 5") == 2, output[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert "last-step=5" in _complete(checkpoints)
    meta = json.loads((checkpoints / "last-step=5" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["epoch"] == 1
    resumed = _run(_torchrun(str(SCRIPT), str(tmp_path), "resume"))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"equal": True, "restarts": 0}


def test_a_killed_rank_restarts_the_group_which_continues_from_last(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "ember", "launch", "--num_processes", "2", "--max_restarts", "1",
        "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path), "kill",
    ]  # fmt: skip
    done = _run(command)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"equal": True, "restarts": 1}
    assert not [e for e in (tmp_path / "checkpoints").iterdir() if e.name.startswith(".tmp-")]
