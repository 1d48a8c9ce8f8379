"""``get_logger``: a ``logging`` logger that speaks once per run, not once per process."""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

from ember.accelerator import distributed


class MultiProcessAdapter(logging.LoggerAdapter):
    """Logs on the main process only, unless a call passes ``main_process_only=False``;
    ``in_order=True`` logs on every process, one after the other (rank 0 first)."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        main_process_only = kwargs.pop("main_process_only", True)
        in_order = kwargs.pop("in_order", False)
        if not self.isEnabledFor(level):
            return
        if in_order:
            for rank in range(distributed.world_size()):
                if rank == distributed.global_rank():
                    message, kwargs = self.process(msg, kwargs)
                    self.logger.log(level, message, *args, **kwargs)
                distributed.barrier()
            return
        if main_process_only and distributed.global_rank() != 0:
            return
        message, kwargs = self.process(msg, kwargs)
        self.logger.log(level, message, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


def get_logger(name: str, log_level: str | int | None = None) -> MultiProcessAdapter:
    """A logger for ``name`` whose calls log on the main process only (as in Accelerate).

    Args:
        name: the logger's name (``__name__``, usually).
        log_level: its level; None takes ``EMBER_LOG_LEVEL`` (or Accelerate's
            ``ACCELERATE_LOG_LEVEL``) when set.

    ``logger.info(msg, main_process_only=False)`` logs on every process;
    ``in_order=True`` does it process by process.

    Examples:
        >>> import logging, sys
        >>> import ember
        >>> logger = ember.get_logger("my_script")
        >>> logger.logger.addHandler(logging.StreamHandler(sys.stdout))
        >>> logger.logger.setLevel(logging.INFO)
        >>> logger.info("printed once, by the main process")
        printed once, by the main process
        >>> logger.info("printed by every process", main_process_only=False)
        printed by every process
    """
    if log_level is None:
        log_level = os.environ.get("EMBER_LOG_LEVEL") or os.environ.get("ACCELERATE_LOG_LEVEL")
    logger = logging.getLogger(name)
    if log_level is not None:
        level = log_level.upper() if isinstance(log_level, str) else log_level
        logger.setLevel(level)
        logger.root.setLevel(level)
    return MultiProcessAdapter(logger, {})
