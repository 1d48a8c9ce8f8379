"""Every bad input of issue item 8: the error type and a message that names what was given."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ember import MisconfigurationError, Trainer, TrainModule
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"precision": "64-true"}, ["precision='64-true'", "'bf16-mixed'"]),
        ({"precision": 8}, ["precision=8"]),
        ({"strategy": "deepspeed"}, ["strategy='deepspeed'", "'ddp'"]),
        ({"accelerator": "tpu"}, ["accelerator='tpu'", "'cuda'"]),
        (
            {"gradient_clip_algorithm": "max"},
            ["gradient_clip_algorithm='max'", "'norm'", "'value'"],
        ),
        ({"gradient_clip_val": -1.0}, ["gradient_clip_val=-1.0"]),
        ({"accumulate_grad_batches": 0}, ["accumulate_grad_batches=0", ">= 1"]),
        ({"accumulate_grad_batches": 2.5}, ["accumulate_grad_batches=2.5"]),
        ({"max_epochs": -5}, ["max_epochs=-5", "-1"]),
        ({"max_steps": -2}, ["max_steps=-2"]),
        ({"max_epochs": 1.5}, ["max_epochs=1.5"]),
        ({"val_check_interval": 1.5}, ["val_check_interval=1.5", "(0, 1]"]),
        ({"val_check_interval": 0}, ["val_check_interval=0"]),
        ({"check_val_every_n_epoch": 0}, ["check_val_every_n_epoch=0"]),
        ({"check_val_every_n_epoch": None}, ["check_val_every_n_epoch=None", "integer"]),
        ({"limit_train_batches": 1.5}, ["limit_train_batches=1.5"]),
        ({"limit_val_batches": -1}, ["limit_val_batches=-1"]),
        ({"num_sanity_val_steps": -2}, ["num_sanity_val_steps=-2"]),
        ({"log_every_n_steps": 0}, ["log_every_n_steps=0"]),
        ({"on_nonfinite_loss": "ignore"}, ["on_nonfinite_loss='ignore'", "'raise'", "'skip'"]),
        ({"devices": 0}, ["devices=0"]),
        ({"devices": 2}, ["devices=N", "test runner", "ember launch"]),
        ({"devices": "many"}, ["devices='many'"]),
        ({"num_nodes": 2}, ["num_nodes=2"]),
        ({"compile": "yes"}, ["compile='yes'"]),
        ({"deterministic": "always"}, ["deterministic='always'"]),
        ({"seed": -1}, ["seed=-1"]),
        ({"callbacks": ["not a callback"]}, ["str"]),
        ({"logger": "tensorboard"}, ["str"]),
        ({"dataloader_config": {"split_batches": True}}, ["DataLoaderConfiguration", "dict"]),
    ],
)
def test_bad_trainer_arguments(kwargs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(MisconfigurationError) as error:
        Trainer(**kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_unavailable_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MisconfigurationError, match="accelerator='cuda'.*no CUDA device"):
        Trainer(accelerator="cuda")


def test_misconfiguration_error_is_a_value_error() -> None:
    assert issubclass(MisconfigurationError, ValueError)


def _fit(module: Any, data: Any = None, **kwargs: Any) -> Trainer:
    trainer = Trainer(max_epochs=1, **bare_trainer_kwargs(), **kwargs)
    trainer.fit(module, data if data is not None else loader(16))
    return trainer


def test_module_without_training_step() -> None:
    class NoStep(TrainModule):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)

    with pytest.raises(MisconfigurationError, match="NoStep does not define training_step"):
        _fit(NoStep())


def test_module_without_configure_optimizers() -> None:
    class NoOptimizer(TrainModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return torch.zeros((), requires_grad=True)

    with pytest.raises(
        MisconfigurationError, match="NoOptimizer does not define configure_optimizers"
    ):
        _fit(NoOptimizer())


def test_not_a_train_module() -> None:
    with pytest.raises(MisconfigurationError, match="Expected a TrainModule.*Linear"):
        Trainer(**bare_trainer_kwargs()).fit(torch.nn.Linear(1, 1), loader(16))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("returned", "fragment"),
    [
        (lambda m: None, "returned NoneType"),
        (lambda m: "adam", "returned str"),
        (lambda m: {"opt": torch.optim.SGD(m.parameters(), lr=0.1)}, "dict with keys 'opt'"),
        (
            lambda m: [
                torch.optim.SGD(m.parameters(), lr=0.1),
                torch.optim.SGD(m.parameters(), lr=0.1),
            ],
            "2 optimizers",
        ),
        (lambda m: (torch.optim.SGD(m.parameters(), lr=0.1), "cosine"), "scheduler of type str"),
        (
            lambda m: {
                "optimizer": (opt := torch.optim.SGD(m.parameters(), lr=0.1)),
                "lr_scheduler": {
                    "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1),
                    "interval": "batch",
                },
            },
            "interval='batch'",
        ),
        (
            lambda m: {
                "optimizer": (opt := torch.optim.SGD(m.parameters(), lr=0.1)),
                "lr_scheduler": {
                    "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1),
                    "frequency": 0,
                },
            },
            "frequency=0",
        ),
        (
            lambda m: {
                "optimizer": (opt := torch.optim.SGD(m.parameters(), lr=0.1)),
                "lr_scheduler": {"sched": torch.optim.lr_scheduler.StepLR(opt, 1)},
            },
            "unknown keys",
        ),
        (
            lambda m: {
                "optimizer": (opt := torch.optim.SGD(m.parameters(), lr=0.1)),
                "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
            },
            "monitor",
        ),
    ],
)
def test_unsupported_configure_optimizers(returned: Any, fragment: str) -> None:
    class Odd(TinyModule):
        def configure_optimizers(self) -> Any:
            return returned(self)

    with pytest.raises(
        MisconfigurationError, match="configure_optimizers|lr_scheduler|ReduceLROnPlateau"
    ) as error:
        _fit(Odd())
    assert fragment in str(error.value)


def test_empty_train_loader() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1)), batch_size=4)
    with pytest.raises(MisconfigurationError, match="training loader is empty"):
        _fit(TinyModule(), empty)
    with pytest.raises(MisconfigurationError, match="limit_train_batches=0.1"):
        _fit(TinyModule(), loader(16), limit_train_batches=0.1)  # 0.1 of 2 batches is none


def test_empty_iterable_train_loader() -> None:
    class Nothing(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(())

    with pytest.raises(MisconfigurationError, match="produced no batch"):
        _fit(TinyModule(), DataLoader(Nothing(), batch_size=4))


def test_no_training_data() -> None:
    with pytest.raises(MisconfigurationError, match="no training data"):
        Trainer(**bare_trainer_kwargs()).fit(TinyModule())


class Returns(TinyModule):
    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return self.make(self(x), y, batch_idx)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda out, y, i: (out - y) ** 2, "non-scalar loss of shape (8, 1)"),
        (lambda out, y, i: ((out - y) ** 2).mean().detach(), "has no gradient"),
        (lambda out, y, i: torch.tensor(1.0), "has no gradient"),
        (lambda out, y, i: {"value": ((out - y) ** 2).mean()}, "without a 'loss' key"),
        (lambda out, y, i: 3.0, "loss of type float"),
    ],
)
def test_bad_losses(make: Any, fragment: str) -> None:
    with pytest.raises(MisconfigurationError) as error:
        _fit(Returns(make))
    assert fragment in str(error.value)
    assert "batch 0" in str(error.value)


def _nan_at(batch: int) -> Any:
    def make(out: torch.Tensor, y: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = ((out - y) ** 2).mean()
        return loss * float("nan") if batch_idx == batch else loss

    return make


def test_nonfinite_loss_raises_naming_step_and_batch() -> None:
    with pytest.raises(FloatingPointError) as error:
        _fit(Returns(_nan_at(2)), loader(64))
    message = str(error.value)
    assert "global step 2" in message
    assert "batch index 2" in message
    assert "on_nonfinite_loss='skip'" in message


def test_nonfinite_loss_in_an_accumulation_window_names_the_batch() -> None:
    with pytest.raises(FloatingPointError, match="global step 1 .*batch index 4"):
        _fit(Returns(_nan_at(4)), loader(64), accumulate_grad_batches=3)


def test_nonfinite_loss_skip_drops_the_update_and_counts_it() -> None:
    skipping = Returns(_nan_at(1))
    trainer = _fit(skipping, loader(32), on_nonfinite_loss="skip", log_every_n_steps=1)
    assert trainer.global_step == 3
    assert trainer.callback_metrics["skipped_steps"] == 1.0
    assert trainer.logged_metrics["skipped_steps"] == 1.0
    assert all(torch.isfinite(p).all() for p in skipping.parameters())

    # The same run without batch 1 gives the same weights: the bad update left no trace.
    class WithoutBatchOne(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    reference = WithoutBatchOne()
    _fit(reference, loader(32))
    for got, expected in zip(skipping.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_validate_without_validation_step_or_data() -> None:
    class TrainOnly(TinyModule):
        validation_step = TrainModule.validation_step  # type: ignore[assignment]

    with pytest.raises(MisconfigurationError, match="needs TrainOnly.validation_step"):
        Trainer(**bare_trainer_kwargs()).validate(TrainOnly(), loader(16))
    with pytest.raises(MisconfigurationError, match="got no data"):
        Trainer(**bare_trainer_kwargs()).test(TinyModule())


def test_ckpt_path_of_the_wrong_type() -> None:
    with pytest.raises(MisconfigurationError, match="ckpt_path=3.*'last', 'best'"):
        Trainer(**bare_trainer_kwargs()).fit(TinyModule(), loader(16), ckpt_path=3)


def test_val_check_interval_longer_than_the_epoch() -> None:
    trainer = Trainer(max_epochs=1, val_check_interval=100, **bare_trainer_kwargs())
    with pytest.raises(MisconfigurationError, match="val_check_interval=100.*2 training batches"):
        trainer.fit(TinyModule(), loader(16), loader(8))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"gradient_clip_val": float("nan")}, "gradient_clip_val=nan"),
        ({"gradient_clip_val": float("inf")}, "gradient_clip_val=inf"),
        ({"default_root_dir": 123}, "default_root_dir=123"),
        ({"enable_progress_bar": "no"}, "enable_progress_bar='no'"),
        ({"enable_checkpointing": 1}, "enable_checkpointing=1"),
        ({"compile": {"bogus": 1}}, "['bogus']"),
        ({"compile": {"mode": "fastest"}}, "compile['mode']='fastest'"),
    ],
)
def test_more_bad_trainer_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MisconfigurationError) as error:
        Trainer(**kwargs)
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda t, m: t.fit(m, 5), "fit() got int, which is not a data loader"),
        (lambda t, m: t.fit(m, loader(16), 5), "validation (dataloaders) got int"),
        (lambda t, m: t.fit(m, [loader(16), loader(16)]), "got 2 training loaders"),
        (lambda t, m: t.fit(m, loader(16), {"a": loader(16)}), "got a dict of loaders (['a'])"),
        (lambda t, m: t.validate(m, "data"), "got str, which is not a data loader"),
        (lambda t, m: t.predict(m), "predict() got no data"),
    ],
)
def test_bad_loaders(call: Any, fragment: str) -> None:
    with pytest.raises(MisconfigurationError) as error:
        call(Trainer(max_epochs=1, **bare_trainer_kwargs()), TinyModule())
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("num_items", "fragment"),
    [("eight", "num_items='eight'"), (-1, "num_items=-1"), (torch.ones(2), "shape (2,)")],
)
def test_bad_num_items(num_items: Any, fragment: str) -> None:
    class BadItems(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return {"loss": super().training_step(batch, batch_idx), "num_items": num_items}

    with pytest.raises(MisconfigurationError) as error:
        _fit(BadItems())
    assert fragment in str(error.value)


def test_predict_restores_the_training_mode() -> None:
    module = TinyModule()
    module.train()
    Trainer(**bare_trainer_kwargs()).predict(module, loader(16))
    assert module.training
