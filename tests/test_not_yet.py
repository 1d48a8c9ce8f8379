"""Names of the contract whose capability has not landed yet fail at once, clearly."""

from __future__ import annotations

import pytest

from ember import MisconfigurationError


def test_model_checkpoint_is_importable_and_refuses_clearly() -> None:
    from ember.callbacks import ModelCheckpoint

    with pytest.raises(MisconfigurationError, match="ModelCheckpoint is not available"):
        ModelCheckpoint(monitor="val_loss")
