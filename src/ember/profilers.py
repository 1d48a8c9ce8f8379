"""The profilers ``Trainer(profiler=...)`` accepts, for when the strings ``"simple"`` and
``"pytorch"`` (their defaults) are not enough: ``SimpleProfiler(synchronize=False)``,
``PyTorchProfiler(dirpath=..., active=10)``. See ``docs/profiling.md``."""

from ember.trainer.profiling import PyTorchProfiler, SimpleProfiler

__all__ = ["PyTorchProfiler", "SimpleProfiler"]
