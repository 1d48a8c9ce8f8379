"""Loggers: CSV (always available), TensorBoard and Weights & Biases (optional extras).

Importing this package imports neither tensorboard nor wandb: each logger imports its
library on first use and names the ``pip install`` to run when it is missing.
"""

from ember.loggers.base import Logger
from ember.loggers.csv import CSVLogger
from ember.loggers.tensorboard import TensorBoardLogger
from ember.loggers.wandb import WandbLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger", "WandbLogger"]
