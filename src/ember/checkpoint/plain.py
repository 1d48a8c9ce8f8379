"""What ``state.pt`` may hold: tensors, numbers, strings, bools, None, and lists, tuples and
dicts of these. ``torch.load(weights_only=True)`` reads exactly that, so loading a checkpoint
can never run code."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ember.errors import CheckpointError

_PLAIN = (bool, int, float, str, type(None))


def check_plain(value: Any, where: str) -> None:
    """Raise ``CheckpointError`` naming the first part of ``value`` that ``state.pt`` cannot
    hold (``where`` is its key path, e.g. ``state['callbacks']['Mine']``)."""
    if isinstance(value, (*_PLAIN, Tensor)):
        if (
            isinstance(value, Tensor)
            and type(value) is not Tensor
            and not isinstance(value, nn.Parameter)
        ):
            raise CheckpointError(
                f"{where} is a {type(value).__name__} (a tensor subclass), which a checkpoint "
                "loaded with weights_only=True cannot hold: store a plain tensor (.detach())."
            )
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            if not isinstance(key, _PLAIN):
                raise CheckpointError(
                    f"{where} has a key of type {type(key).__name__} ({key!r}); checkpoint keys "
                    "must be str, int, float, bool or None."
                )
            check_plain(inner, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            check_plain(inner, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where} is a {type(value).__name__}, which a checkpoint cannot hold: state.pt is "
        "loaded with torch.load(weights_only=True) and keeps only tensors, numbers, strings, "
        "bools, None and lists, tuples and dicts of these. Convert it (e.g. to a dict) in "
        "state_dict() / on_save_checkpoint."
    )


def plain_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` as ``state.pt`` keeps them (the conversion of ``hparams.yaml``, strictly).

    Enums become their value, paths str, numpy scalars Python numbers, namespaces and
    dataclasses dicts; tensors stay. An ``nn.Module`` argument is left out with a warning
    (pass it to ``load_from_checkpoint`` again). Anything else raises ``CheckpointError``
    naming its key, before anything is written.
    """
    result: dict[str, Any] = {}
    for key, value in hparams.items():
        if isinstance(value, nn.Module):
            warnings.warn(
                f"hparams[{key!r}] is an nn.Module ({type(value).__name__}); the checkpoint "
                f"leaves it out. Pass it again: load_from_checkpoint(path, {key}=...).",
                UserWarning,
                stacklevel=3,
            )
            continue
        result[str(key)] = _convert(value, f"hparams[{key!r}]")
    return result


def _convert(value: Any, where: str) -> Any:
    if isinstance(value, enum.Enum):
        return _convert(value.value, where)
    if isinstance(value, _PLAIN):
        return value if type(value) in _PLAIN else type(value).__mro__[1](value)
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "size", None) == 1 and hasattr(value, "dtype"):
        return item()  # a numpy scalar
    if isinstance(value, Mapping):
        return {str(k): _convert(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        return {str(k): _convert(v, f"{where}.{k}") for k, v in vars(value).items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _convert(getattr(value, field.name), f"{where}.{field.name}")
            for field in dataclasses.fields(value)
        }
    if isinstance(value, (list, tuple)):
        converted = [_convert(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return converted if isinstance(value, list) else tuple(converted)
    raise CheckpointError(
        f"{where} is a {type(value).__name__} ({value!r:.80}), which a checkpoint cannot hold "
        "(state.pt keeps tensors, numbers, strings, bools, None, lists and dicts). Leave it "
        "out with save_hyperparameters(ignore=[...]) and pass it to load_from_checkpoint."
    )
