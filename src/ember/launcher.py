"""Starting the processes of a run (placeholder until the launcher lands)."""

from __future__ import annotations

from ember.accelerator import distributed
from ember.errors import MisconfigurationError


def check_devices_agree(devices: int | None, num_nodes: int) -> None:
    """Under a launcher, an explicit ``devices=N`` must match the processes per machine."""
    per_machine = distributed.local_world_size()
    if devices is not None and devices != per_machine:
        raise MisconfigurationError(
            f"`devices={devices}` disagrees with the launcher, which started {per_machine} "
            f"processes on this machine (WORLD_SIZE={distributed.world_size()}). Pass "
            "devices='auto' or the same number to both."
        )


def launch_workers_if_needed(num_processes: int) -> None:
    """Start the other processes of a ``Trainer(devices=N)`` run (arrives with the launcher)."""
    raise MisconfigurationError(
        f"`devices={num_processes}` from a plain `python script.py`: start it with "
        f"`ember launch --num_processes {num_processes} script.py` or torchrun."
    )
