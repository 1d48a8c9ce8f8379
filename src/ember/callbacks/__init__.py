"""Built-in callbacks."""

from ember.callbacks.progress import ProgressBar

__all__ = ["ProgressBar"]
