"""The lower layer: devices, distribution, precision, data and gradient accumulation."""

from ember.accelerator.accelerator import Accelerator
from ember.accelerator.transfer import DataLoaderConfiguration

__all__ = ["Accelerator", "DataLoaderConfiguration"]
