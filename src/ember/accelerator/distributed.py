"""The only module that knows about ranks and process groups.

Everything else asks these functions (through the strategy or the trainer). With one
process they answer 0 / 1 and every collective is the identity.

The process group is torch's own (``torch.distributed``), started from the environment a
launcher sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):
``torchrun`` / ``ember launch``, or a ``Trainer(devices=N)`` that started its own workers.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_distributed
from torch import Tensor

from ember.errors import MisconfigurationError

#: torch's own default for a collective's timeout; ``EMBER_COLLECTIVE_TIMEOUT`` overrides.
DEFAULT_TIMEOUT = timedelta(minutes=30)

_REDUCE_OPS = {
    "sum": torch_distributed.ReduceOp.SUM,
    "min": torch_distributed.ReduceOp.MIN,
    "max": torch_distributed.ReduceOp.MAX,
}


# --- who am I -------------------------------------------------------------------------------
def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is running."""
    return torch_distributed.is_available() and torch_distributed.is_initialized()


def global_rank() -> int:
    """This process's rank over all machines."""
    if is_initialized():
        return torch_distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank on its machine (the GPU index it should use)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """How many processes take part."""
    if is_initialized():
        return torch_distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    """How many processes run on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def launched_externally() -> bool:
    """Whether a launcher (torchrun, ``ember launch``, a parent Trainer) started this process
    as one of several."""
    return world_size() > 1


# --- the process group -----------------------------------------------------------------------
def restart_count() -> int:
    """How many times torchrun's elastic agent restarted this group (0 on the first attempt
    and without torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def collective_timeout(timeout: timedelta | None) -> timedelta:
    """The collectives' timeout: ``EMBER_COLLECTIVE_TIMEOUT`` (seconds) when set, else
    ``timeout``, else torch's 30 minutes."""
    from_env = os.environ.get("EMBER_COLLECTIVE_TIMEOUT")
    if from_env:
        try:
            seconds = float(from_env)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise MisconfigurationError(
                f"EMBER_COLLECTIVE_TIMEOUT={from_env!r} is not supported: give a number of "
                "seconds > 0."
            )
        return timedelta(seconds=seconds)
    return timeout if timeout is not None else DEFAULT_TIMEOUT


def init_process_group(device: torch.device, timeout: timedelta) -> None:
    """Join the process group the launcher described in the environment (gloo on CPU, nccl
    on CUDA); nothing when it is already running or there is one process."""
    if is_initialized() or world_size() == 1:
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if name not in os.environ]
    if missing:
        raise MisconfigurationError(
            f"WORLD_SIZE={world_size()} is set but {', '.join(missing)} is not: start the script "
            "with `ember launch --num_processes N script.py` or `torchrun`, which set them all."
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_distributed.init_process_group(
        backend=backend,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
        **_attempt_store(timeout),
    )
    # Leave the group at exit: a gloo group still open then can abort the interpreter
    # ("terminate called without an active exception") and turn exit code 0 into 134.
    atexit.register(_leave_at_exit)


def _attempt_store(timeout: timedelta) -> dict[str, Any]:
    """Under torchrun's elastic agent, the store of this attempt: the agent's store, whose
    keys outlive a restart, under a prefix of its own. Without it, a restarted process can
    read a peer's address of the failed attempt and fail ("Connection refused") or hang
    (reproduced with gloo on 127.0.0.1). Empty elsewhere: the default ``env://``."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = torch_distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size(),
        is_master=False,
        timeout=timeout,
    )
    return {
        "store": torch_distributed.PrefixStore(f"/ember/attempt_{restart_count()}", store),
        "rank": global_rank(),
        "world_size": world_size(),
    }


def _leave_at_exit() -> None:
    if getattr(sys, "last_value", None) is not None:
        # Exiting on an uncaught exception: the peers may be waiting in a collective for
        # this process, so waiting for them would hang both sides. Leave at once (the
        # launcher ends the others), without the group's C++ teardown, which can abort with
        # gloo's threads still running and turn exit code 1 into 134.
        if is_initialized():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return
    try:
        destroy_process_group()
    except Exception:  # nothing left to leave cleanly
        pass
    # Also when the script left the group itself: objects still holding gloo's threads (a
    # DDP reducer in a reference cycle) are freed now, not in the interpreter's teardown,
    # where freeing them can abort the process.
    gc.collect()


def destroy_process_group() -> None:
    """Leave the process group, together with the other processes (a bounded wait: a peer
    that is gone cannot hold this for more than 10 seconds)."""
    if not is_initialized():
        return
    try:
        if torch_distributed.get_backend() == "gloo":
            # gloo aborts a process whose peer closed the connection under it.
            torch_distributed.monitored_barrier(timeout=timedelta(seconds=10))
    except Exception:  # a peer already gone, or slower than the bound
        pass
    # Wrapped modules (FSDP) hold the group in reference cycles; freed after the group is
    # gone, gloo can abort the interpreter at exit.
    gc.collect()
    torch_distributed.destroy_process_group()


# --- agreeing on a flag without waiting ------------------------------------------------------
class Agreement:
    """A flag (stop now?) the processes agree on without a blocking collective per step.

    A vote is a bool or a small int (the Trainer votes 2 for "preempted: save and exit",
    1 for "stop", 0 for "go on"); the decision is the highest vote.
    ``exchange(local)`` returns the decision of the previous round (true when any process
    voted so then) and starts this round's vote as a non-blocking all-reduce, read at the
    next call: every process stops at the same step, one step after the first one asked.
    With one process it returns ``local`` at once. ``settle()`` reads the round in flight
    (at an epoch's end, so the rounds stay aligned).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self._work: Any = None
        self._vote: Tensor | None = None
        #: Several processes (decided once: this is called every step).
        self.shared = is_initialized() and world_size() > 1

    def exchange(self, local: int) -> int:
        if not self.shared:
            return local
        agreed = self.settle()
        self._vote = torch.tensor([int(local)], device=self.device)
        self._work = torch_distributed.all_reduce(
            self._vote, op=torch_distributed.ReduceOp.MAX, async_op=True
        )
        return agreed

    def now(self, local: int) -> int:
        """Agree at once (a blocking all-reduce; between epochs, not per step)."""
        pending = self.settle()
        if not is_initialized():
            return max(int(local), pending)
        vote = torch.tensor([max(int(local), pending)], device=self.device)
        torch_distributed.all_reduce(vote, op=torch_distributed.ReduceOp.MAX)
        return int(vote.item())

    def settle(self) -> int:
        """The decision of the round in flight (0 when none is)."""
        if self._work is None or self._vote is None:
            return 0
        self._work.wait()
        agreed = int(self._vote.item())
        self._work = self._vote = None
        return agreed


# --- collectives (the identity with one process) ----------------------------------------------
def barrier() -> None:
    """Wait until every process arrives here."""
    if is_initialized():
        torch_distributed.barrier()


def all_reduce(tensor: Tensor, reduction: str) -> Tensor:
    """``tensor`` reduced over processes: "sum", "mean", "min" or "max" (a new tensor)."""
    if not is_initialized():
        return tensor
    result = tensor.clone()
    if reduction == "mean":
        torch_distributed.all_reduce(result, op=torch_distributed.ReduceOp.SUM)
        return result / world_size()
    torch_distributed.all_reduce(result, op=_REDUCE_OPS[reduction])
    return result


def all_gather(tensor: Tensor) -> Tensor:
    """Every process's ``tensor`` concatenated along dim 0 (in rank order). The sizes may
    differ along dim 0 (they are exchanged first); the other dims must agree."""
    if not is_initialized():
        return tensor
    scalar = tensor.ndim == 0
    tensor = tensor.reshape(1) if scalar else tensor.contiguous()
    count = world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(count)]
    torch_distributed.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    lengths = [int(size.item()) for size in sizes]
    longest = max(lengths)
    if tensor.shape[0] < longest:  # all_gather wants equal shapes: pad, then cut back
        padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    parts = [torch.empty_like(tensor) for _ in range(count)]
    torch_distributed.all_gather(parts, tensor)
    return torch.cat([part[:length] for part, length in zip(parts, lengths, strict=True)])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as process ``src`` has it (any picklable object)."""
    if not is_initialized():
        return obj
    holder = [obj if global_rank() == src else None]
    torch_distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_tensor(tensor: Tensor, src: int = 0) -> Tensor:
    """``tensor`` as process ``src`` has it (same shape and dtype on every process)."""
    if not is_initialized():
        return tensor
    tensor = tensor.clone()
    torch_distributed.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (any picklable object)."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch_distributed.all_gather_object(gathered, obj)
    return gathered
