"""ember: a PyTorch training library.

Write a ``TrainModule``, call ``Trainer(...).fit(module, train_loader, val_loader)``; or keep
your own loop and use the ``Accelerator`` underneath.
"""

from ember.accelerator import Accelerator, DataLoaderConfiguration
from ember.accelerator.fsdp import FSDPStrategy
from ember.accelerator.strategies import DDPStrategy, DistributedType
from ember.batch_size import find_executable_batch_size
from ember.datamodule import DataModule
from ember.errors import CheckpointError, MisconfigurationError
from ember.hooks import Callback
from ember.module import TrainModule
from ember.process_log import get_logger
from ember.seed import seed_everything
from ember.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Accelerator",
    "Callback",
    "CheckpointError",
    "DDPStrategy",
    "DataLoaderConfiguration",
    "DataModule",
    "DistributedType",
    "FSDPStrategy",
    "MisconfigurationError",
    "TrainModule",
    "Trainer",
    "__version__",
    "find_executable_batch_size",
    "get_logger",
    "seed_everything",
]
