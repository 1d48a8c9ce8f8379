"""``ember.DataModule`` through the Trainer: where the loaders come from, the order of its
hooks, its state in checkpoints and its hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ember import Callback, DataModule, MisconfigurationError, Trainer, TrainModule
from tests.helpers import MemoryLogger, TinyModule, bare_trainer_kwargs, loader


class Recorder(Callback):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self.calls.append(f"callback.setup({stage})")

    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self.calls.append(f"callback.teardown({stage})")


class Data(DataModule):
    """Records every call; ``built`` counts the training loaders built (its state)."""

    def __init__(self, batch_size: int = 8, calls: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore="calls")
        self.calls = calls if calls is not None else []
        self.built = 0

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup({stage})")

    def teardown(self, stage: str) -> None:
        self.calls.append(f"teardown({stage})")

    def train_dataloader(self) -> Any:
        self.calls.append("train_dataloader")
        self.built += 1
        return loader(32, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> Any:
        self.calls.append("val_dataloader")
        return loader(16, batch_size=self.hparams.batch_size, seed=1)

    def test_dataloader(self) -> Any:
        self.calls.append("test_dataloader")
        return loader(16, batch_size=self.hparams.batch_size, seed=2)

    def predict_dataloader(self) -> Any:
        self.calls.append("predict_dataloader")
        return loader(16, batch_size=self.hparams.batch_size, seed=3)

    def state_dict(self) -> dict[str, Any]:
        return {"built": self.built}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calls.append(f"load_state_dict({state_dict})")
        self.built = state_dict["built"]


class Module(TinyModule):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def setup(self, stage: str) -> None:
        self.calls.append(f"module.setup({stage})")

    def teardown(self, stage: str) -> None:
        self.calls.append(f"module.teardown({stage})")


def _trainer(calls: list[str], **kwargs: Any) -> Trainer:
    options = {**bare_trainer_kwargs(), **kwargs}
    return Trainer(max_epochs=1, callbacks=[Recorder(calls)], **options)


def test_fit_takes_its_loaders_from_the_datamodule_in_lightnings_order() -> None:
    calls: list[str] = []
    data = Data(calls=calls)
    trainer = _trainer(calls)
    assert trainer.datamodule is None
    trainer.fit(Module(calls), datamodule=data)
    assert calls == [
        "prepare_data",
        "setup(fit)",
        "callback.setup(fit)",
        "module.setup(fit)",
        "train_dataloader",
        "val_dataloader",
        "teardown(fit)",
        "callback.teardown(fit)",
        "module.teardown(fit)",
    ]
    assert trainer.global_step == 4  # 32 samples in batches of 8
    assert "val_loss" in trainer.callback_metrics
    assert trainer.datamodule is data and data.trainer is trainer


def test_fit_takes_a_datamodule_in_place_of_the_loaders() -> None:
    trainer = _trainer([])
    trainer.fit(TinyModule(), Data(batch_size=16))  # as Lightning's trainer.fit(model, dm)
    assert trainer.global_step == 2


def test_validate_test_predict_take_a_datamodule() -> None:
    calls: list[str] = []
    data = Data(calls=calls)
    trainer = _trainer(calls)
    module = Module(calls)
    assert set(trainer.validate(module, datamodule=data)[0]) == {"val_loss"}
    assert set(trainer.test(module, datamodule=data)[0]) == {"test_loss"}
    assert len(trainer.predict(module, datamodule=data)) == 2
    assert set(trainer.test(module, data)[0]) == {"test_loss"}  # in place of the loaders
    stages = [call for call in calls if call.startswith(("setup", "teardown"))]
    assert stages == [
        "setup(validate)",
        "teardown(validate)",
        "setup(test)",
        "teardown(test)",
        "setup(predict)",
        "teardown(predict)",
        "setup(test)",
        "teardown(test)",
    ]
    assert calls[:4] == ["prepare_data", "setup(validate)", "callback.setup(validate)",
                         "module.setup(validate)"]  # fmt: skip
    assert calls[4] == "val_dataloader"  # after every setup hook


def test_loaders_given_both_ways_are_refused() -> None:
    trainer = _trainer([])
    with pytest.raises(MisconfigurationError, match="both a DataModule.*train_dataloaders"):
        trainer.fit(TinyModule(), loader(16), datamodule=Data())
    with pytest.raises(MisconfigurationError, match="both a DataModule.*val_dataloaders"):
        trainer.fit(TinyModule(), val_dataloaders=loader(16), datamodule=Data())
    with pytest.raises(MisconfigurationError, match="test\\(\\) got both a DataModule"):
        trainer.test(TinyModule(), loader(16), datamodule=Data())
    with pytest.raises(MisconfigurationError, match="datamodule=list.*ember.DataModule"):
        trainer.fit(TinyModule(), datamodule=[loader(16)])  # type: ignore[arg-type]


def test_a_datamodule_without_the_stages_loader() -> None:
    with pytest.raises(
        MisconfigurationError, match="no training data.*DataModule.train_dataloader"
    ):
        _trainer([]).fit(TinyModule(), datamodule=DataModule())
    with pytest.raises(MisconfigurationError, match="got no data.*DataModule.test_dataloader"):
        _trainer([]).test(TinyModule(), datamodule=DataModule())


def test_datamodule_state_and_hparams_are_in_checkpoints(tmp_path: Path) -> None:
    data = Data(batch_size=8)
    trainer = _trainer([])
    trainer.fit(TinyModule(), datamodule=data)
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["datamodule"] == {"built": 1}
    assert state["datamodule_hparams"] == {"batch_size": 8}

    calls: list[str] = []
    resumed = Data(batch_size=8, calls=calls)
    later = Trainer(max_epochs=2, **bare_trainer_kwargs())
    later.fit(TinyModule(), datamodule=resumed, ckpt_path=path)
    # Put back after setup and before the loaders are built (their shape may depend on it).
    assert calls[1:4] == ["setup(fit)", "load_state_dict({'built': 1})", "train_dataloader"]
    assert resumed.built == 2 and later.global_step == 8


def test_datamodule_hparams_reach_the_loggers() -> None:
    class WithHparams(TinyModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__(lr=lr)
            self.save_hyperparameters()

    logger = MemoryLogger()
    module = WithHparams()
    Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False).fit(
        module, datamodule=Data(batch_size=16)
    )
    assert logger.hparams == {"batch_size": 16, "lr": 0.1}  # the DataModule's and the module's


def test_datamodule_defaults_do_nothing() -> None:
    data = DataModule()
    data.prepare_data()
    data.setup("fit")
    data.teardown("fit")
    data.load_state_dict({})
    assert data.state_dict() == {} and data.trainer is None and dict(data.hparams) == {}
    loaders = (data.train_dataloader, data.val_dataloader, data.test_dataloader)
    assert all(method() is None for method in (*loaders, data.predict_dataloader))


def test_overfit_batches_uses_the_datamodule_loaders() -> None:
    seen: list[tuple[str, list[float]]] = []

    class Shuffled(DataModule):
        def train_dataloader(self) -> Any:
            return loader(32, batch_size=8, shuffle=True)

        def val_dataloader(self) -> Any:
            return loader(32, batch_size=8, seed=5)

    class Seeing(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(("train", batch[0][:, 0].tolist()))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            seen.append(("val", batch[0][:, 0].tolist()))

    with pytest.warns(UserWarning, match="overfit_batches"):
        Trainer(
            **bare_trainer_kwargs(), max_epochs=1, overfit_batches=2, num_sanity_val_steps=0
        ).fit(Seeing(), datamodule=Shuffled())
    first_two = [batch[0][:, 0].tolist() for batch in list(loader(32, batch_size=8))[:2]]
    assert [values for stage, values in seen if stage == "train"] == first_two  # unshuffled
    assert [values for stage, values in seen if stage == "val"] == first_two  # the same batches
