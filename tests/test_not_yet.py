"""Names of the contract whose capability has not landed yet fail at once, clearly."""

from __future__ import annotations

from typing import Any

import pytest

from ember import MisconfigurationError
from tests.helpers import TinyModule


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: TinyModule.load_from_checkpoint("x"), "TrainModule.load_from_checkpoint"),
    ],
)
def test_checkpoint_names_raise_a_clear_error(call: Any, name: str) -> None:
    with pytest.raises(MisconfigurationError, match=f"{name} is not available in this version"):
        call()


def test_model_checkpoint_is_importable_and_refuses_clearly() -> None:
    from ember.callbacks import ModelCheckpoint

    with pytest.raises(MisconfigurationError, match="ModelCheckpoint is not available"):
        ModelCheckpoint(monitor="val_loss")
