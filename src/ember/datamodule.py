"""``DataModule``: the data of a run in one object, as Lightning's ``LightningDataModule``.

A DataModule gathers what a dataset needs: downloading or building it once per machine
(``prepare_data``), splitting and transforming it on every process (``setup``), the loaders
of each stage, and what must survive a restart (``state_dict``). Pass it as
``Trainer.fit(module, datamodule=dm)`` (or to ``validate`` / ``test`` / ``predict``).

In each ``fit`` / ``validate`` / ``test`` / ``predict`` given a DataModule, the Trainer calls:

1. ``prepare_data()`` on local rank 0 of each machine, while the other processes wait;
2. ``setup(stage)`` on every process, before the callbacks' and the module's ``setup``;
3. the stage's ``*_dataloader()`` methods (fit: ``train_dataloader`` and
   ``val_dataloader``), after a checkpoint given as ``ckpt_path`` has been put back with
   ``load_state_dict``;
4. ``teardown(stage)`` at the end, before the callbacks' and the module's ``teardown``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.module import HyperParameters, TrainModule

if TYPE_CHECKING:
    from ember.trainer import Trainer


class DataModule:
    """The data of a run: override the methods you need; every one has a do-nothing default.

    Attributes:
        hparams: what ``save_hyperparameters()`` recorded (sent to the loggers with the
            module's and saved in checkpoints).
        trainer: the Trainer running it (None before the first run).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset, random_split
        >>> import ember
        >>> class Numbers(ember.DataModule):
        ...     def __init__(self, batch_size: int = 8) -> None:
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...
        ...     def setup(self, stage):
        ...         x = torch.randn(40, 3)
        ...         data = TensorDataset(x, x.sum(dim=1, keepdim=True))
        ...         self.train_set, self.val_set = random_split(data, [32, 8])
        ...
        ...     def train_dataloader(self):
        ...         return DataLoader(self.train_set, batch_size=self.hparams.batch_size)
        ...
        ...     def val_dataloader(self):
        ...         return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
        >>> class Regression(ember.TrainModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.layer = nn.Linear(3, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         return nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        ...
        ...     def validation_step(self, batch, batch_idx):
        ...         self.log("val_loss", nn.functional.mse_loss(self.layer(batch[0]), batch[1]))
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> trainer = ember.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                         enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Regression(), datamodule=Numbers(batch_size=8))
        >>> trainer.global_step, sorted(trainer.callback_metrics)
        (4, ['val_loss'])
    """

    def __init__(self) -> None:
        self.hparams = HyperParameters()
        self.trainer: Trainer | None = None

    def prepare_data(self) -> None:
        """Download or build the data: called once per machine (local rank 0), before
        ``setup``, while the other processes of the machine wait. Do not set state here: the
        other processes do not run it."""

    def setup(self, stage: str) -> None:
        """Build the datasets on every process; ``stage`` is "fit", "validate", "test" or
        "predict"."""

    def train_dataloader(self) -> Any:
        """The training loader of ``fit`` (None: none)."""
        return None

    def val_dataloader(self) -> Any:
        """The validation loader(s) of ``fit`` and ``validate`` (None: none)."""
        return None

    def test_dataloader(self) -> Any:
        """The loader(s) of ``test`` (None: none)."""
        return None

    def predict_dataloader(self) -> Any:
        """The loader(s) of ``predict`` (None: none)."""
        return None

    def teardown(self, stage: str) -> None:
        """Release what ``setup(stage)`` built, at the end of the run (errors included)."""

    def state_dict(self) -> dict[str, Any]:
        """What a Trainer checkpoint keeps of this DataModule (under ``"datamodule"``): plain
        values only (tensors, numbers, strings, bools, None, lists / tuples / dicts)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Put back what ``state_dict`` returned (on ``fit(ckpt_path=...)``, after ``setup``
        and before the loaders are built)."""

    if TYPE_CHECKING:

        def save_hyperparameters(self, *names: str, ignore: list[str] | str | None = None) -> None:
            """Record the arguments of the calling ``__init__`` in ``self.hparams``."""

    else:
        # TrainModule's own, which reads the arguments of the frame that calls it.
        save_hyperparameters = TrainModule.save_hyperparameters
