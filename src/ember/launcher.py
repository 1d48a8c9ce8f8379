"""Starting the worker processes of a run, and ending all of them when one fails.

Two ways in, one contract (SPEC section 4 and 9):

- ``ember launch`` (``cli.py``) starts ``torch.distributed.run`` (torchrun), whose agent sets
  ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` for every worker and ends the others when one fails.
- ``Trainer(devices=N)`` started with plain ``python script.py`` calls
  :func:`launch_workers_if_needed`: the process re-runs its own command line N-1 times as
  ranks 1..N-1, becomes rank 0, and supervises the others the way torchrun's agent would.

Either way, no failure may leave a process waiting in a collective for the 30-minute
timeout: a failed or killed worker makes the parent end every other one and exit non-zero, a
dead parent takes its workers with it, and the traceback that caused it is printed once, with
its rank; the processes that only noticed a dead peer say so in one line.

This module writes the launcher's variables (``RANK``, ``WORLD_SIZE``...) for the processes it
starts; reading them for anything else stays in ``accelerator/distributed.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch.distributed as torch_distributed

from ember.accelerator import distributed
from ember.errors import MisconfigurationError

#: Set by ``ember launch`` for its workers: a folder where each failing worker leaves a
#: one-line summary, so the launcher's last line can name the rank that failed first.
FAILURES_DIRECTORY_VARIABLE = "EMBER_LAUNCH_FAILURES"
#: Set for the workers a ``Trainer(devices=N)`` parent starts: the parent's pid to watch.
PARENT_PID_VARIABLE = "EMBER_PARENT_PID"

#: How long a worker asked to stop (SIGTERM) gets before it is killed.
TERMINATE_GRACE_SECONDS = 5.0
#: How often the parent looks at its workers, and a worker at its parent.
POLL_SECONDS = 0.1

# Messages of errors that only say a peer went away: gloo's, and torch's c10d store's.
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "Broken pipe",
    "Connection refused",
)


# --- ports -----------------------------------------------------------------------------------
def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` cannot be bound on ``host`` (another process holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


# --- the process count -----------------------------------------------------------------------
def _environment_count(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def check_devices_agree(devices: int, num_nodes: int = 1) -> None:
    """Raise when a launcher's ``WORLD_SIZE`` disagrees with ``Trainer(devices=..., num_nodes=...)``.

    ``devices`` counts the processes on one machine, as in Lightning: on one machine it must
    equal ``WORLD_SIZE``; on several, ``LOCAL_WORLD_SIZE``, with ``devices x num_nodes`` equal
    to ``WORLD_SIZE``. Does nothing when no launcher set ``WORLD_SIZE``.
    """
    world = _environment_count("WORLD_SIZE")
    if world is None:
        return
    local = _environment_count("LOCAL_WORLD_SIZE") or world
    if devices == local and (num_nodes == 1 or devices * num_nodes == world):
        return
    asked = f"devices={devices}" + (f", num_nodes={num_nodes}" if num_nodes != 1 else "")
    raise MisconfigurationError(
        f"Trainer({asked}) disagrees with the launcher, which started WORLD_SIZE={world} "
        f"processes ({local} on this machine). Pass devices={local} or devices='auto', or "
        f"launch {devices * num_nodes} processes (`ember launch --num_processes "
        f"{devices * num_nodes} script.py`)."
    )


# --- self-launch: Trainer(devices=N) from plain `python script.py` --------------------------------
def _rerun_command() -> list[str]:
    """The command that started this process, to run again for the other ranks."""
    import __main__

    script = sys.argv[0] if sys.argv else ""
    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)
    if script in ("", "-c") or interactive or not hasattr(__main__, "__file__"):
        raise MisconfigurationError(
            "Trainer(devices=N) with N > 1 starts its other processes by running this script "
            "again, but this process has no script to run (an interactive session, `python -c` "
            "or a notebook). Put the code in a file and run `ember launch --num_processes N "
            "script.py` (or `python script.py`), or use devices=1 here."
        )
    spec = getattr(__main__, "__spec__", None)
    runner = spec.name if spec is not None else Path(script).name
    if runner.split(".")[0] in ("pytest", "py", "unittest"):
        # Running the test session again as rank 1 would run every test twice.
        raise MisconfigurationError(
            f"Trainer(devices=N) with N > 1 inside a test runner ({runner}) would start the "
            "whole test session again as the other processes. In a test, run a script with "
            "`ember launch --num_processes N script.py` (or torchrun) in a subprocess."
        )
    if spec is not None and spec.name not in ("__main__", ""):  # started as `python -m module`
        module = spec.name.removesuffix(".__main__")
        return [sys.executable, "-m", module, *sys.argv[1:]]
    if not Path(script).is_file():
        raise MisconfigurationError(
            f"Trainer(devices=N) with N > 1 runs this script again, but {script!r} is not a "
            f"file (looked in {Path.cwd()}). Start it with `ember launch --num_processes N "
            f"{script}` instead."
        )
    return [sys.executable, *sys.argv]


def launch_workers_if_needed(num_processes: int | None, num_nodes: int = 1) -> None:
    """Make this process one of ``num_processes`` (per machine; None: as many as a launcher
    started, else one). Call it before joining the process group.

    - Started by a launcher (``WORLD_SIZE`` set: ``ember launch``, torchrun, or a parent
      Trainer): checks that ``num_processes`` agrees (:func:`check_devices_agree`; None always
      does), prints failures with their rank, and, in a worker of a parent Trainer, ends this
      process when the parent dies. Starts nothing.
    - ``num_processes`` None or <= 1: nothing.
    - Otherwise (plain ``python script.py``): runs the same command ``num_processes - 1``
      times as ranks 1.. with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
      ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``, sets the same for itself as rank
      0, and returns; a thread then watches the workers: when one fails, the others are ended
      and this process exits non-zero, even from inside a collective. At exit, rank 0 waits
      for its workers and exits non-zero if one failed.

    Raises:
        MisconfigurationError: from an interactive session, ``python -c`` or a notebook; with
            ``num_nodes > 1`` and no launcher; when ``num_processes`` disagrees with the
            launcher's ``WORLD_SIZE``.
    """
    if "WORLD_SIZE" in os.environ:
        if num_processes is not None:
            check_devices_agree(num_processes, num_nodes)
        install_excepthook()
        _watch_parent()
        return
    if num_nodes <= 1 and (num_processes is None or num_processes <= 1):
        return
    if num_nodes > 1:
        raise MisconfigurationError(
            f"Trainer(num_nodes={num_nodes}) needs a launcher on every machine: run `ember "
            f"launch --num_processes {(num_processes or 1) * num_nodes} --num_machines {num_nodes} "
            "--machine_rank R --main_process_ip IP script.py` on machine R."
        )
    assert num_processes is not None  # num_nodes == 1 and num_processes > 1 here
    command = _rerun_command()
    shared = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
        "WORLD_SIZE": str(num_processes),
        "LOCAL_WORLD_SIZE": str(num_processes),
    }
    worker_only = {PARENT_PID_VARIABLE: str(os.getpid())}
    workers = [
        subprocess.Popen(
            command,
            env={**os.environ, **shared, **worker_only, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(1, num_processes)
    ]
    os.environ.update({**shared, "RANK": "0", "LOCAL_RANK": "0"})
    install_excepthook()
    supervisor = _Supervisor(workers)
    threading.Thread(target=supervisor.watch, name="ember-workers", daemon=True).start()
    atexit.register(supervisor.wait_at_exit)


def _exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + signal for a killed one."""
    return returncode if returncode >= 0 else 128 - returncode


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class _Supervisor:
    """Rank 0's view of the workers it started: watch them, end them, wait for them."""

    def __init__(self, workers: Sequence[subprocess.Popen[bytes]]) -> None:
        self.workers = list(workers)
        self._ending = threading.Lock()

    def failure(self) -> tuple[int, int] | None:
        """(rank, exit code) of a worker that failed, if any."""
        for rank, worker in enumerate(self.workers, start=1):
            code = worker.poll()
            if code is not None and code != 0:
                return rank, _exit_code(code)
        return None

    def all_done(self) -> bool:
        return all(worker.poll() is not None for worker in self.workers)

    def end_all(self) -> None:
        """SIGTERM every worker still running, SIGKILL those that outlive the grace period."""
        with self._ending:
            for worker in self.workers:
                if worker.poll() is None:
                    worker.terminate()
            deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
            for worker in self.workers:
                try:
                    worker.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()

    def _stop_after_failure(self, rank: int, code: int) -> None:
        self.end_all()
        print(
            f"[rank0]: stopped: the worker with rank {rank} failed (exit code {code}); "
            "every other process was ended.",
            file=sys.stderr,
        )
        _flush_and_exit(code or 1)

    def watch(self) -> None:
        """The watcher thread: the first failed worker ends the run, even when rank 0's main
        thread is blocked (in a collective that will never complete, or anywhere else)."""
        while True:
            failed = self.failure()
            if failed is not None and not _failing.is_set():
                self._stop_after_failure(*failed)
            if failed is not None or self.all_done():
                return  # rank 0's excepthook and wait_at_exit take it from here
            time.sleep(POLL_SECONDS)

    def wait_at_exit(self) -> None:
        """At rank 0's exit: when rank 0 failed, end the workers (and report a worker's failure
        that caused it); else wait for them and exit with the first failure's code."""
        if _failing.is_set():
            # A worker that failed first is probably still exiting: give it a moment, and read
            # its own exit code before ending the others (which would report our SIGTERM).
            deadline = time.monotonic() + 2.0
            while self.failure() is None and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
            failed = self.failure()
            self.end_all()
            if failed is not None and not _own_failure.is_set():
                self._stop_after_failure(*failed)
            return
        deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
        while not self.all_done() and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if not self.all_done():
            # Rank 0 is done but a worker is not: if it waits for rank 0 in a collective, closing
            # the group makes that collective fail now instead of at its timeout.
            distributed.destroy_process_group()
        while not self.all_done():
            time.sleep(POLL_SECONDS)
        failed = self.failure()
        if failed is not None:
            self._stop_after_failure(*failed)


def _set_parent_death_signal() -> None:
    """Linux: have the kernel send SIGKILL to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


_watching_parent = False


def _watch_parent() -> None:
    """In a worker of a parent Trainer: end this process when the parent is gone."""
    global _watching_parent
    parent = os.environ.get(PARENT_PID_VARIABLE, "")
    if _watching_parent or not parent.isdigit():
        return
    _watching_parent = True
    _set_parent_death_signal()
    parent_pid = int(parent)

    def watch() -> None:
        while os.getppid() == parent_pid:  # an orphan is re-parented to init or a subreaper
            time.sleep(POLL_SECONDS * 5)
        _flush_and_exit(1)

    threading.Thread(target=watch, name="ember-parent", daemon=True).start()


# --- failures: one traceback, with its rank --------------------------------------------------
_failing = threading.Event()  # this process is ending with an uncaught exception
_own_failure = threading.Event()  # ...that is its own, not a report of a dead peer
_hook_installed = False


def caused_by_peer(error: BaseException) -> bool:
    """Whether ``error`` only reports that another process went away (its own error, printed
    by that process, is the one that matters)."""
    if isinstance(error, (torch_distributed.DistNetworkError, torch_distributed.DistStoreError)):
        return True
    return any(text in str(error) for text in _PEER_GONE)


def _first_sentence(message: str) -> str:
    """``message`` without gloo's source location, cut after its first sentence."""
    text = (message.strip().splitlines() or [""])[0]
    if text.startswith("[") and "] " in text:  # "[.../pair.cc:553] Connection closed by peer"
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")[:200] + "."


def format_failure(
    error_type: type[BaseException], error: BaseException, trace: TracebackType | None
) -> tuple[list[str], bool]:
    """The lines to print for an uncaught exception, and whether it is this process's own
    failure (False: it only noticed a peer's failure, or was interrupted)."""
    if isinstance(error, KeyboardInterrupt):
        return ["stopped: interrupted (KeyboardInterrupt)."], False
    if caused_by_peer(error):
        return [
            "stopped: another process failed first (see its own message, with its rank); "
            f"here: {error_type.__name__}: {_first_sentence(str(error))}"
        ], False
    text = "".join(traceback.format_exception(error_type, error, trace))
    return text.rstrip("\n").splitlines(), True


def _record_failure(lines: list[str], original: bool) -> None:
    """Leave a one-line summary for ``ember launch``'s last line (when it asked for one)."""
    folder = os.environ.get(FAILURES_DIRECTORY_VARIABLE)
    if not folder:
        return
    record = {"rank": distributed.global_rank(), "original": original, "summary": lines[-1]}
    record["time"] = time.time()
    with contextlib.suppress(OSError):
        Path(folder, f"rank{record['rank']}.json").write_text(json.dumps(record))


def install_excepthook() -> None:
    """Print an uncaught exception once, each line prefixed with ``[rankN]: `` (torch's
    spelling); an error that only reports a dead peer becomes one line. Idempotent."""
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True

    def excepthook(
        error_type: type[BaseException], error: BaseException, trace: TracebackType | None
    ) -> None:
        lines, original = format_failure(error_type, error, trace)
        if original or issubclass(error_type, KeyboardInterrupt):  # its own reason to stop
            _own_failure.set()
        _failing.set()
        _record_failure(lines, original)
        # torch's init_process_group wraps the hook it finds and adds "[rankN]: " itself.
        prefix = "" if sys.excepthook is not excepthook else f"[rank{distributed.global_rank()}]: "
        sys.stderr.write("".join(f"{prefix}{line}\n" for line in lines))
        sys.stderr.flush()

    sys.excepthook = excepthook


def launch_failure_summary(folder: Path) -> str | None:
    """The line ``ember launch`` prints after its workers failed: the rank that failed on its
    own (not because a peer did), or None when none left a summary (e.g. killed by a signal)."""
    records = []
    for path in folder.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    originals = sorted((r for r in records if r.get("original")), key=lambda r: r["time"])
    if not originals:
        return None
    first = originals[0]
    return (
        f"rank {first['rank']} failed with {first['summary']} (its traceback is above, "
        f"lines prefixed [rank{first['rank']}]:); the other processes were ended."
    )
