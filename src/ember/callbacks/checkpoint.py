"""``ModelCheckpoint``: its name is part of the contract; checkpoints themselves are not here yet."""

from __future__ import annotations

from typing import Any

from ember.errors import not_available_yet
from ember.hooks import Callback


class ModelCheckpoint(Callback):
    """Keeps the best checkpoints by a monitored metric (arrives with checkpoint support).

    Building one raises a clear error today, so a script written against the contract fails
    at once, before any training is lost, and says why.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise not_available_yet(
            "ModelCheckpoint",
            "Pass enable_checkpointing=False (or leave it at its default, which writes nothing "
            "yet) and keep the weights with `trainer.accelerator.save_model(module, directory)`.",
        )
