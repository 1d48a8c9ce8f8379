"""Built-in callbacks."""

from ember.callbacks.checkpoint import ModelCheckpoint
from ember.callbacks.early_stopping import EarlyStopping
from ember.callbacks.lr_monitor import LearningRateMonitor
from ember.callbacks.model_summary import ModelSummary
from ember.callbacks.plot_curves import PlotCurves
from ember.callbacks.progress import ProgressBar
from ember.callbacks.throughput import ThroughputMonitor

__all__ = [
    "EarlyStopping",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "PlotCurves",
    "ProgressBar",
    "ThroughputMonitor",
]
