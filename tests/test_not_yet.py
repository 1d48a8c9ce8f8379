"""Names of the contract whose capability has not landed yet fail at once, clearly."""

from __future__ import annotations

from typing import Any

import pytest

from ember import Accelerator, MisconfigurationError
from tests.helpers import TinyModule


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: TinyModule.load_from_checkpoint("x"), "TrainModule.load_from_checkpoint"),
        (lambda: Accelerator(cpu=True).save_state("x"), "Accelerator.save_state"),
        (lambda: Accelerator(cpu=True).load_state("x"), "Accelerator.load_state"),
        (
            lambda: Accelerator(cpu=True).register_for_checkpointing(object()),
            "Accelerator.register_for_checkpointing",
        ),
    ],
)
def test_checkpoint_names_raise_a_clear_error(call: Any, name: str) -> None:
    with pytest.raises(MisconfigurationError, match=f"{name} is not available in this version"):
        call()
