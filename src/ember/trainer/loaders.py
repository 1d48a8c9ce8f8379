"""Preparing the Trainer's data loaders: checks, ``limit_*_batches``, and the accelerator's
``prepare_data_loader`` (sharding, device transfer)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from ember.accelerator.data import PreparedDataLoader
from ember.datamodule import DataModule
from ember.errors import MisconfigurationError
from ember.hooks import transfer_hooks
from ember.trainer import arguments

if TYPE_CHECKING:
    from ember.accelerator.accelerator import Accelerator
    from ember.module import TrainModule


def datamodule_of(
    entry: str, datamodule: Any, **loaders: Any
) -> tuple[DataModule | None, tuple[Any, ...]]:
    """The DataModule of ``Trainer.<entry>()`` and its loader arguments (``loaders``, in
    order): ``datamodule``, or a DataModule passed as the first loader argument
    (``fit(module, dm)``, as Lightning allows), which then reads as None. A DataModule and
    loaders given together are an error: the loaders come one way."""
    names = list(loaders)
    if datamodule is None and isinstance(loaders[names[0]], DataModule):
        datamodule, loaders[names[0]] = loaders[names[0]], None
    if datamodule is None:
        return None, tuple(loaders.values())
    if not isinstance(datamodule, DataModule):
        raise MisconfigurationError(
            f"Trainer.{entry}() got datamodule={type(datamodule).__name__}; pass an "
            "ember.DataModule (an instance of a subclass) or None."
        )
    given = [name for name, value in loaders.items() if value is not None]
    if given:
        raise MisconfigurationError(
            f"Trainer.{entry}() got both a DataModule ({type(datamodule).__name__}) and "
            f"{' and '.join(given)}: pass the loaders one way, either datamodule=... (its "
            f"*_dataloader() methods give them) or {' / '.join(names)}, not both."
        )
    return datamodule, tuple(loaders.values())


def start_datamodule(accelerator: Accelerator, datamodule: DataModule, stage: str) -> None:
    """``prepare_data`` once per machine (local rank 0, the others waiting), then
    ``setup(stage)`` on every process."""
    if accelerator.is_local_main_process:
        datamodule.prepare_data()
    accelerator.wait_for_everyone()
    datamodule.setup(stage)


def fit_loaders(module: TrainModule | DataModule, train: Any, val: Any) -> tuple[Any, Any]:
    """The training and validation loaders of fit: those given, else the module's (or the
    DataModule's) own."""
    train = train if train is not None else module.train_dataloader()
    if train is None:
        raise MisconfigurationError(
            "fit() got no training data: pass train_dataloaders or define "
            f"{type(module).__name__}.train_dataloader()."
        )
    return train, val if val is not None else module.val_dataloader()


def eval_loaders(entry: str, stage: str, module: TrainModule | DataModule, dataloaders: Any) -> Any:
    """The loaders of ``Trainer.<entry>()`` ("validate", "test", "predict"): those given, else
    the ``val_dataloader()`` / ``test_dataloader()`` / ``predict_dataloader()`` of the module
    (or DataModule)."""
    method = {"validation": "val_dataloader", "test": "test_dataloader"}.get(
        stage, "predict_dataloader"
    )
    if dataloaders is None:
        dataloaders = getattr(module, method)()
    if dataloaders is None:
        raise MisconfigurationError(
            f"Trainer.{entry}() got no data: pass dataloaders or define "
            f"{type(module).__name__}.{method}()."
        )
    return dataloaders


def prepare_train_loader(
    accelerator: Accelerator,
    loader: Any,
    limit_train_batches: int | float | None,
    val_check_interval: int | float,
    check_val_every_n_epoch: int | None,
    validates: bool = True,
    *,
    module: TrainModule | None = None,
) -> tuple[PreparedDataLoader, int | None]:
    """The prepared training loader and its exact number of batches per epoch (None when it
    is not certain), after checking that it trains on something and, when fit ``validates``,
    fits the validation interval. ``module``: whose batch-transfer hooks run on each batch
    (dataloader_idx 0)."""
    arguments.check_loader("fit()", loader)
    if isinstance(loader, (list, tuple)) and any(
        isinstance(item, (DataLoader, PreparedDataLoader)) for item in loader
    ):
        raise MisconfigurationError(
            f"fit() got {len(loader)} training loaders; it trains on one. Combine their "
            "datasets (torch.utils.data.ConcatDataset) into one loader."
        )
    length = arguments.length(loader)
    if length == 0:
        raise MisconfigurationError(
            "The training loader is empty (0 batches). Check the dataset's length and "
            "the batch size (with drop_last=True a dataset smaller than one batch is empty)."
        )
    if accelerator.num_processes > 1 and not accelerator.dataloader_config.even_batches:
        raise MisconfigurationError(
            "DataLoaderConfiguration(even_batches=False) for the Trainer's training loader in "
            f"a run of {accelerator.num_processes} processes: every process must take every "
            "optimizer step (each is a collective), so the last round is padded. Leave "
            "even_batches=True (it still applies as given to Accelerator.prepare in your own "
            "loop, and evaluation loaders are never padded)."
        )
    hooks = transfer_hooks(module, 0) if module is not None else None
    prepared = accelerator.prepare_data_loader(loader, transfer_hooks=hooks)
    if limit_train_batches == 0:
        # As in Lightning 2.6: fit runs only the sanity check (``loops.fit``).
        prepared.max_batches = 0
        return prepared, 0
    # The limit counts this process's batches (as in Lightning): a fraction of its share,
    # so N processes with batch B stop where one process with batch N x B does.
    limit = arguments.apply_limit(
        "limit_train_batches", limit_train_batches, prepared.known_length()
    )
    if limit == 0:
        raise MisconfigurationError(
            f"`limit_train_batches={limit_train_batches!r}` leaves 0 of the loader's "
            f"{prepared.known_length()} batches (on this process) to train on; raise it."
        )
    prepared.max_batches = limit
    # Only a certain length decides windows and validation timing (an IterableDataset's
    # __len__ is an estimate).
    num_batches = prepared.exact_length()
    interval = val_check_interval
    if not validates:
        return prepared, num_batches  # the interval is never used
    if isinstance(interval, int) and num_batches is not None:
        if interval > num_batches and check_val_every_n_epoch is not None:
            raise MisconfigurationError(
                f"`val_check_interval={interval}` is more than the {num_batches} "
                "training batches of an epoch. Use a smaller interval, or set "
                "check_val_every_n_epoch=None to count batches over epochs."
            )
    elif isinstance(interval, float) and interval != 1.0 and num_batches is None:
        raise MisconfigurationError(
            f"`val_check_interval={interval}` is a fraction of an epoch, but the training "
            "loader has no length. Give an integer number of batches instead."
        )
    return prepared, num_batches


def prepare_eval_loaders(
    accelerator: Accelerator,
    dataloaders: Any,
    limit: int | float | None,
    stage: str,
    *,
    even_batches: bool | None = None,
    module: TrainModule | None = None,
) -> tuple[list[PreparedDataLoader], list[int | None]]:
    """The prepared loaders of ``stage`` ("validation", "test", "predict") and the number of
    batches of each (None: unknown), on this process.

    In a run of several processes they are sharded without padding (``even_batches=False``,
    whatever the configuration says): no sample is evaluated twice, ranks may run different
    numbers of batches and a rank may run none. Where every forward is a collective (FSDP,
    ``accelerator.pads_evaluation``) they are padded instead (``even_batches=None`` decides
    so), with a warning when padding repeats samples in the metrics. Each prepared loader's
    ``batch_places`` then says where
    every batch sits in the epoch's order (``ember.accelerator.data.assemble_in_order`` puts
    gathered predictions back in dataset order). ``limit`` counts this process's batches (a
    fraction: of its share). ``module``: whose batch-transfer hooks run on each batch, with
    the loader's index as ``dataloader_idx``.
    """
    arguments.check_loader(f"{stage} (dataloaders)", dataloaders)
    loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
    for loader in loaders:
        arguments.check_loader(f"{stage} (dataloaders)", loader)
    if even_batches is None:
        even_batches = accelerator.pads_evaluation
    prepared = []
    lengths: list[int | None] = []
    for index, loader in enumerate(loaders):
        if even_batches and accelerator.num_processes > 1:
            warn_if_padding_repeats(accelerator, loader, stage)
        item = accelerator.prepare_data_loader(
            loader,
            even_batches=even_batches,
            remember=False,
            transfer_hooks=transfer_hooks(module, index) if module is not None else None,
        )
        item.max_batches = arguments.apply_limit(
            f"limit_{'val' if stage == 'validation' else stage}_batches",
            limit,
            item.known_length(),
        )
        prepared.append(item)
        lengths.append(item.known_length())
    return prepared, lengths


def warn_if_padding_repeats(accelerator: Accelerator, loader: Any, stage: str) -> None:
    """Warn when padded evaluation (FSDP) repeats samples: the dataset size does not divide
    world size x batch size (or is unknown), so the last round is filled with duplicates."""
    processes = accelerator.num_processes
    batch_size = getattr(loader, "batch_size", None)
    dataset = getattr(loader, "dataset", None)
    try:
        size: int | None = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        size = None
    if isinstance(batch_size, int) and batch_size > 0:
        per_round = (
            batch_size if accelerator.dataloader_config.split_batches else batch_size * processes
        )
        if size is not None and size % per_round == 0:
            return
        what = (
            f"{size} samples, which world size x batch size = {per_round} does not divide"
            if size is not None
            else "a dataset without a length"
        )
    else:
        what = "a loader without a fixed batch size"
    warnings.warn(
        f"{stage} under FSDP runs padded batches ({processes} processes: every forward is a "
        f"collective, so each process must run as many batches), and this loader has {what}: "
        "the last round repeats samples from the start of the epoch, so metrics averaged over "
        "the loader count them twice. For exact metrics, make the dataset size a multiple of "
        "world size x batch size.",
        UserWarning,
        stacklevel=3,
    )
