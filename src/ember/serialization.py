"""Writing weights: safetensors files written atomically (temporary file, then rename)."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def save_safetensors(
    state_dict: dict[str, Tensor], path: str | os.PathLike[str], atomic: bool = True
) -> None:
    """Write ``state_dict`` to ``path`` so that plain ``safetensors.torch.load_file`` reads it
    back whole: tensors sharing memory (tied weights) are each written out in full.
    ``atomic``: through a temporary file renamed into place (False: inside a directory that
    is itself renamed into place)."""
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        shares_memory = key in seen and tensor.numel() > 0
        seen.add(key)
        tensors[name] = tensor.clone().contiguous() if shares_memory else tensor.contiguous()
    if any(not tensor.is_cpu for tensor in tensors.values()):
        tensors = {name: tensor.cpu() for name, tensor in tensors.items()}
    path = Path(path)
    if not atomic:
        save_file(tensors, str(path))
        return
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temporary))
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
