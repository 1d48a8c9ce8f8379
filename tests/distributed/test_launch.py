"""Launching real processes on 127.0.0.1 (gloo): ``ember launch`` and ``Trainer(devices=N)``'s
self-launch, and that a failure anywhere ends every process within the bound.

The worker script uses ``torch.distributed`` directly and calls
``launch_workers_if_needed(devices, num_nodes)`` at the top, exactly as ``Trainer.__init__``
does. Every launch is time-bounded; a process group left behind by a failed test is killed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ember
from ember.errors import MisconfigurationError
from ember.launcher import (
    check_devices_agree,
    find_free_port,
    format_failure,
    launch_failure_summary,
    launch_workers_if_needed,
)

SOURCE = Path(ember.__file__).resolve().parents[1]
#: Every failure must end every process well within this (the collectives' default is 30 min).
BOUND_SECONDS = 30.0

WORKER = """
import os, signal, sys, time
from ember.launcher import launch_workers_if_needed

mode, devices, nodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
launch_workers_if_needed(devices, nodes)  # what Trainer(devices=..., num_nodes=...) calls

import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # torch's default timeout: 30 minutes
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
print(f"rank {rank} of {world} pid {os.getpid()} sum {total.item()}", flush=True)
if rank == 1 and mode in ("raise", "raise-while-rank-0-sleeps"):
    raise ValueError("boom on rank 1")
if rank == 1 and mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if rank == 0 and mode == "raise-while-rank-0-sleeps":
    time.sleep(600)  # not in a collective: only the parent's watcher can end this
if rank == 1 and mode == "hang":
    time.sleep(600)
dist.all_reduce(total)  # the survivors wait here for the rank that failed
from ember.accelerator import distributed

distributed.destroy_process_group()  # together, after gc (gloo may abort otherwise)
print(f"rank {rank} done", flush=True)
"""


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _environment() -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    }
    environment["PYTHONPATH"] = os.pathsep.join([str(SOURCE), environment.get("PYTHONPATH", "")])
    environment["OMP_NUM_THREADS"] = "1"
    return environment


def _start(command: list[str]) -> subprocess.Popen[str]:
    # A session of its own, so a test that fails can kill everything it started.
    return subprocess.Popen(
        command,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str, float]:
    """(exit code, output, seconds) of ``process``; kills its whole session past ``timeout``."""
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"still running after {timeout} s:\n{output}")
    return process.returncode, output, time.monotonic() - started


def _run(command: list[str]) -> tuple[int, str, float]:
    return _finish(_start(command))


def _ember_launch(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "ember", "launch", *arguments]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; nobody may be reaping it in a container


def _sums(output: str) -> dict[int, float]:
    found = re.findall(r"rank (\d) of 2 pid \d+ sum ([\d.]+)", output)
    return {int(rank): float(total) for rank, total in found}


def _assert_failed_once(code: int, output: str, seconds: float) -> None:
    """Non-zero, within the bound, rank 1's traceback printed once and nobody else's."""
    assert code != 0, output
    assert seconds < BOUND_SECONDS, output
    assert output.count("]: Traceback (most recent call last)") == 1, output
    assert output.count("[rank1]: ValueError: boom on rank 1") == 1, output
    assert "[rank0]: Traceback" not in output, output


# --- ember launch (torchrun) -----------------------------------------------------------------
def test_ember_launch_runs_two_ranks_that_all_reduce(worker: Path) -> None:
    code, output, _ = _run(_ember_launch("--num_processes", "2", str(worker), "ok", "2", "1"))
    assert code == 0, output
    assert _sums(output) == {0: 3.0, 1: 3.0}
    assert "rank 0 done" in output and "rank 1 done" in output


def test_two_machines_on_one_host_rendezvous_and_all_reduce(worker: Path) -> None:
    port = str(find_free_port())
    common = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1"]
    machines = [
        _start(
            _ember_launch(
                *common, "--main_process_port", port, "--machine_rank", str(rank),
                str(worker), "ok", "1", "2",
            )
        )
        for rank in (0, 1)
    ]  # fmt: skip
    results = [_finish(machine) for machine in machines]
    for code, output, _ in results:
        assert code == 0, output
    assert _sums(results[0][1]) == {0: 3.0} and _sums(results[1][1]) == {1: 3.0}


def test_ember_launch_a_rank_that_raises_ends_the_run(worker: Path) -> None:
    code, output, seconds = _run(
        _ember_launch("--num_processes", "2", str(worker), "raise", "2", "1")
    )
    _assert_failed_once(code, output, seconds)
    assert "rank 0 done" not in output
    assert output.rstrip().splitlines()[-1] == (
        "ember launch: error: rank 1 failed with ValueError: boom on rank 1 (its traceback is "
        "above, lines prefixed [rank1]:); the other processes were ended. Exit code 1."
    )


def test_ember_launch_a_rank_killed_by_sigkill_ends_the_run(worker: Path) -> None:
    code, output, seconds = _run(
        _ember_launch("--num_processes", "2", str(worker), "kill", "2", "1")
    )
    assert code != 0 and seconds < BOUND_SECONDS, output
    assert "]: Traceback" not in output, output  # no worker's traceback (torchrun has its own)
    assert "Signal 9 (SIGKILL)" in output  # torchrun's summary names the rank and the signal
    assert "[rank0]: stopped: another process failed first" in output
    assert output.rstrip().splitlines()[-1].startswith("ember launch: error: a worker failed")


# --- Trainer(devices=2) from plain `python script.py` ------------------------------------------
def test_self_launch_runs_two_ranks_and_exits_zero(worker: Path) -> None:
    code, output, _ = _run([sys.executable, str(worker), "ok", "2", "1"])
    assert code == 0, output
    assert _sums(output) == {0: 3.0, 1: 3.0}
    assert "rank 0 done" in output and "rank 1 done" in output


def test_self_launch_reruns_a_module_started_with_python_m(worker: Path, tmp_path: Path) -> None:
    package = tmp_path / "project"
    package.mkdir()
    (package / "__init__.py").write_text("")
    worker.rename(package / "train.py")
    code, output, _ = _run([sys.executable, "-m", "project.train", "ok", "2", "1"])  # cwd: tmp_path
    assert code == 0, output
    assert _sums(output) == {0: 3.0, 1: 3.0}


def test_self_launch_a_child_that_raises_ends_the_parent(worker: Path) -> None:
    code, output, seconds = _run([sys.executable, str(worker), "raise", "2", "1"])
    _assert_failed_once(code, output, seconds)
    assert "rank 0 done" not in output


def test_self_launch_a_failed_child_ends_a_parent_that_is_not_in_a_collective(
    worker: Path,
) -> None:
    code, output, seconds = _run(
        [sys.executable, str(worker), "raise-while-rank-0-sleeps", "2", "1"]
    )
    _assert_failed_once(code, output, seconds)
    # Exit code 1, or 134 when torch's gloo threads abort the exiting worker (it happens).
    assert re.search(r"\[rank0\]: stopped: the worker with rank 1 failed \(exit code \d+\)", output)


def test_self_launch_a_child_killed_by_sigkill_ends_the_parent(worker: Path) -> None:
    code, output, seconds = _run([sys.executable, str(worker), "kill", "2", "1"])
    assert code == 128 + signal.SIGKILL and seconds < BOUND_SECONDS, output
    assert "Traceback" not in output, output
    assert "[rank0]: stopped: the worker with rank 1 failed (exit code 137)" in output


def test_self_launch_children_die_with_a_killed_parent(worker: Path) -> None:
    parent = _start([sys.executable, str(worker), "hang", "2", "1"])
    assert parent.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while len(_sums("".join(lines))) < 2 and time.monotonic() < deadline:
        lines.append(parent.stdout.readline())
    pids = [int(pid) for pid in re.findall(r"rank 1 of 2 pid (\d+)", "".join(lines))]
    assert len(pids) == 1, "".join(lines)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + BOUND_SECONDS
    while _alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(pids[0])
    if alive:
        os.kill(pids[0], signal.SIGKILL)
    assert not alive


def test_python_c_refuses_to_self_launch() -> None:
    code, output, _ = _run(
        [
            sys.executable,
            "-c",
            "from ember.launcher import launch_workers_if_needed; launch_workers_if_needed(2)",
        ]
    )
    assert code == 1
    assert (
        "MisconfigurationError: Trainer(devices=N) with N > 1 starts its other processes" in output
    )
    assert "`python -c`" in output and "ember launch --num_processes N script.py" in output


# --- in-process ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["-c"], [""], []])
def test_no_script_to_rerun_is_refused(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MisconfigurationError, match="ember launch --num_processes N"):
        launch_workers_if_needed(2)


def test_a_notebook_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import __main__

    launcher = tmp_path / "ipykernel_launcher.py"
    launcher.write_text("")
    monkeypatch.setattr(sys, "argv", [str(launcher), "-f", "kernel.json"])
    monkeypatch.delattr(__main__, "__file__", raising=False)  # a kernel's __main__ has none
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MisconfigurationError, match="a notebook"):
        launch_workers_if_needed(2)


def test_one_process_and_no_launcher_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["-c"])  # would be refused if it tried to start anything
    launch_workers_if_needed(1)
    launch_workers_if_needed(None)  # devices="auto"
    assert "WORLD_SIZE" not in os.environ


def test_several_nodes_without_a_launcher_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MisconfigurationError, match="needs a launcher on every machine"):
        launch_workers_if_needed(2, num_nodes=2)


def test_devices_that_disagree_with_world_size_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr("ember.launcher._hook_installed", False)
    check_devices_agree(2)
    launch_workers_if_needed(None)  # devices="auto" takes the launcher's count
    with pytest.raises(MisconfigurationError) as error:
        launch_workers_if_needed(4)  # under a launcher it checks, and starts nothing
    message = str(error.value)
    assert "Trainer(devices=4)" in message and "WORLD_SIZE=2" in message
    assert "devices=2" in message and "--num_processes 4" in message
    # Several machines: devices counts the processes of one machine, as in Lightning.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_devices_agree(2, num_nodes=2)
    with pytest.raises(MisconfigurationError, match="num_nodes=3"):
        check_devices_agree(2, num_nodes=3)


def test_a_dead_peer_is_one_line_and_an_own_error_a_traceback() -> None:
    gloo = RuntimeError(
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
        "peer [127.0.0.1]:5545. This is typically caused by a remote worker crashing."
    )
    lines, original = format_failure(RuntimeError, gloo, None)
    assert not original and len(lines) == 1
    assert lines[0].endswith("RuntimeError: Connection closed by peer [127.0.0.1]:5545.")
    try:
        raise ValueError("mine")
    except ValueError as error:
        lines, original = format_failure(ValueError, error, error.__traceback__)
    assert original and lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: mine"


def test_the_launch_summary_names_the_first_own_failure(tmp_path: Path) -> None:
    assert launch_failure_summary(tmp_path) is None
    records = [
        '{"rank": 0, "original": false, "summary": "stopped: ...", "time": 1.0}',
        '{"rank": 3, "original": true, "summary": "KeyError: 3", "time": 3.0}',
        '{"rank": 2, "original": true, "summary": "ValueError: 2", "time": 2.0}',
    ]
    for index, record in enumerate(records):
        (tmp_path / f"rank{index}.json").write_text(record)
    summary = launch_failure_summary(tmp_path)
    assert summary is not None and summary.startswith("rank 2 failed with ValueError: 2")
