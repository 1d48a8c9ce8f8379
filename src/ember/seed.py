"""Seeding every random number generator a training run touches."""

from __future__ import annotations

import random

import numpy as np
import torch

from ember.errors import MisconfigurationError

_MAX_SEED = 2**32 - 1


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device).

    Data-loader worker processes need nothing more: torch derives each worker's seed for
    ``random``, NumPy and torch from the generator seeded here.

    Args:
        seed: an integer in ``[0, 2**32 - 1]``.

    Returns:
        The seed, for logging.

    Examples:
        >>> import torch, ember
        >>> ember.seed_everything(42)
        42
        >>> first = torch.rand(2)
        >>> _ = ember.seed_everything(42)
        >>> torch.equal(first, torch.rand(2))
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise MisconfigurationError(
            f"`seed={seed!r}` is not supported: it must be an integer in [0, {_MAX_SEED}]."
        )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA devices too
    return seed
