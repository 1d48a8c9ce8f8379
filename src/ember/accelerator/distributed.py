"""The only module that knows about ranks and process groups.

Everything else asks these functions (through the strategy or the trainer). With one
process they answer 0 / 1 and every collective is the identity.
"""

from __future__ import annotations

import os

import torch.distributed as torch_distributed


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


def launched_externally() -> bool:
    """Whether a launcher (torchrun, ``ember launch``) started this process in a group."""
    return world_size() > 1
