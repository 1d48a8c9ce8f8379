"""Starting a scenario script in two real processes (gloo on 127.0.0.1) for the tests: one
launch per test module, since each launch pays torch's start-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables, with the repository importable and
    one thread per process."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        # Absolute: a relative entry (PYTHONPATH=src) would mean another folder in the child.
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)]
            + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
        **extra,
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    env.pop("EMBER_STRATEGY", None)
    return env


def run_two_processes(script: Path, *args: str, timeout: int = 180, **extra_env: str) -> None:
    """``torchrun --nproc_per_node 2 script args``; fails the test with the output's end when
    a process fails."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *args,
    ]  # fmt: skip
    done = subprocess.run(
        command, env=clean_environment(**extra_env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
