"""The Trainer and its loops."""

from ember.trainer.trainer import Trainer

__all__ = ["Trainer"]
