"""Loop progress: everything the loop needs to continue exactly where it stopped.

It is one dataclass so a checkpoint saves and restores it whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: Fields that describe what the process is doing now, never saved.
TRANSIENT = ("stage", "sanity_checking")


@dataclass(slots=True)  # slots: read and written every batch
class LoopState:
    """Where fit stands.

    Attributes:
        epoch: the current epoch (0-based), incremented after each finished epoch.
        global_step: optimizer steps taken over the whole run.
        batch_idx: batches of the current epoch already processed.
        accumulation_position: batches of the open accumulation window already processed
            (0 when the last processed batch closed its window).
        total_batch_idx: training batches processed over the whole run.
        skipped_steps: updates dropped because a loss was not finite (``"skip"`` mode).
        flushed_step: the step whose step values the loggers last received (a resumed run
            does not send that step's values twice).
        validation_batches / test_batches: evaluation batches run so far (the sanity check
            not counted): the step at which their step values reach the loggers.
        stage: "fit", "validate", "test", "predict" or None between calls.
        sanity_checking: True during the validation sanity check before training.
    """

    epoch: int = 0
    global_step: int = 0
    batch_idx: int = 0
    accumulation_position: int = 0
    total_batch_idx: int = 0
    skipped_steps: int = 0
    validation_batches: int = 0
    test_batches: int = 0
    flushed_step: int = 0
    stage: str | None = None
    sanity_checking: bool = False

    def state_dict(self) -> dict[str, Any]:
        """The persisted progress, as plain Python values (not the transient flags ``stage``
        and ``sanity_checking``, which describe the process, not the run)."""
        progress = asdict(self)
        for flag in TRANSIENT:
            progress.pop(flag)
        return progress

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the fields saved by ``state_dict`` (unknown keys and the transient flags
        are ignored)."""
        names = {field.name for field in fields(self)} - set(TRANSIENT)
        for key, value in state.items():
            if key in names:
                setattr(self, key, value)
