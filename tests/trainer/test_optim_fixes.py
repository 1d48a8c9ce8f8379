"""Submodule modes kept, gradients from before fit, configure_optimizers forms, schedulers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ember import MisconfigurationError, Trainer, TrainModule
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


# --- submodules the user put in eval mode stay there ----------------------------------------
class FrozenBackbone(TrainModule):
    """A BatchNorm + Dropout backbone the user froze and put in eval mode, and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 1)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.seen: list[tuple[str, bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append(("train", self.backbone[1].training, self.head.training))
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(("val", self.backbone[1].training, self.head.training))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append(("predict", self.backbone[1].training, self.head.training))
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_submodules_set_to_eval_stay_in_eval_through_fit_validation_and_predict() -> None:
    module = FrozenBackbone()
    running_mean = module.backbone[1].running_mean.clone()
    trainer = Trainer(max_epochs=2, **bare_trainer_kwargs())
    trainer.fit(module, loader(32), loader(16))
    train = [entry for entry in module.seen if entry[0] == "train"]
    val = [entry for entry in module.seen if entry[0] == "val"]
    assert train and all(entry[1:] == (False, True) for entry in train)
    assert val and all(entry[1:] == (False, False) for entry in val)
    # The BatchNorm in eval mode never updated its statistics.
    assert torch.equal(module.backbone[1].running_mean, running_mean)
    assert not module.backbone.training and not module.backbone[1].training
    assert module.head.training and module.training
    trainer.validate(module, loader(16))
    trainer.predict(module, loader(16))
    assert [entry[1:] for entry in module.seen if entry[0] == "predict"] == [(False, False)] * 2
    assert not module.backbone[1].training and module.head.training and module.training


# --- gradients left on the parameters before fit ---------------------------------------------
class ManualTiny(TinyModule):
    """TinyModule stepping its optimizer itself (no zero_grad before the first backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("module_class", [TinyModule, ManualTiny])
def test_gradients_left_before_fit_do_not_reach_the_first_step(
    module_class: type[TinyModule],
) -> None:
    clean = module_class()
    Trainer(max_steps=1, **bare_trainer_kwargs()).fit(clean, loader())
    dirty = module_class()
    for parameter in dirty.parameters():
        parameter.grad = torch.full_like(parameter, 100.0)
    Trainer(max_steps=1, **bare_trainer_kwargs()).fit(dirty, loader())
    for expected, got in zip(clean.parameters(), dirty.parameters(), strict=True):
        assert torch.equal(expected, got)


# --- configure_optimizers: top-level monitor, foreign optimizers, OneCycleLR per epoch -------
class Plateau(TinyModule):
    """ReduceLROnPlateau on a metric that never improves, in the form ``form``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", 1.0)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
        if self.form == "top-level monitor":
            return {"optimizer": optimizer, "lr_scheduler": plateau, "monitor": "val_loss"}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": plateau},
            "monitor": "val_loss",
        }


@pytest.mark.parametrize("form", ["top-level monitor", "top-level monitor, scheduler dict"])
def test_a_top_level_monitor_serves_reduce_lr_on_plateau(form: str) -> None:
    trainer = Trainer(max_epochs=3, num_sanity_val_steps=0, **bare_trainer_kwargs())
    trainer.fit(Plateau(form), loader(16), loader(16))
    assert trainer.lr_scheduler_configs[0].monitor == "val_loss"
    # Epoch 1 sets the best value; epochs 2 and 3 do not improve: the lr is halved twice.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_a_scheduler_of_an_optimizer_not_returned_is_refused(form: str) -> None:
    class Foreign(TinyModule):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            other = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(other, 1)
            if form == "tuple":
                return optimizer, scheduler
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    with pytest.raises(MisconfigurationError, match="StepLR is built on an optimizer") as error:
        Trainer(max_steps=1, **bare_trainer_kwargs()).fit(Foreign(), loader())
    assert "configure_optimizers did not return" in str(error.value)


def test_one_cycle_lr_stepped_per_epoch_warns() -> None:
    class OneCyclePerEpoch(TinyModule):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, total_steps=10)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": one_cycle}}

    with pytest.warns(UserWarning, match="OneCycleLR .*interval='epoch'"):
        Trainer(max_steps=1, **bare_trainer_kwargs()).fit(OneCyclePerEpoch(), loader())


# --- the "strict" key of a scheduler dict ---------------------------------------------------
class PlateauOnMissing(TinyModule):
    """ReduceLROnPlateau watching a name nobody logs, with ``strict`` as given."""

    def __init__(self, strict: bool | None) -> None:
        super().__init__()
        self.strict = strict

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        scheduler: dict[str, Any] = {"scheduler": plateau, "monitor": "never_logged"}
        if self.strict is not None:
            scheduler["strict"] = self.strict
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def test_strict_false_skips_a_plateau_step_whose_metric_is_missing_with_a_warning() -> None:
    trainer = Trainer(max_epochs=2, **bare_trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="'never_logged'.*strict=False.*skipped") as record:
        trainer.fit(PlateauOnMissing(strict=False), loader(16))
    assert sum("never_logged" in str(item.message) for item in record) == 2  # once per epoch
    assert trainer.lr_scheduler_configs[0].strict is False
    assert trainer.current_epoch == 2


@pytest.mark.parametrize("strict", [None, True])
def test_strict_by_default_a_missing_plateau_metric_raises(strict: bool | None) -> None:
    with pytest.raises(MisconfigurationError, match="'never_logged', which was not logged"):
        Trainer(max_epochs=1, **bare_trainer_kwargs()).fit(PlateauOnMissing(strict), loader(16))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("strict", "no", "`strict='no'` is not supported"), ("name", 3, "`name=3` is not supported")],
)
def test_strict_must_be_a_bool_and_name_a_string(key: str, value: Any, message: str) -> None:
    class BadKey(TinyModule):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            step = torch.optim.lr_scheduler.StepLR(optimizer, 1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, key: value}}

    with pytest.raises(MisconfigurationError, match=message):
        Trainer(max_steps=1, **bare_trainer_kwargs()).fit(BadKey(), loader(16))
