"""Which ranks must have logged a synced name (``epoch_sync.check_agreement``), in one
process; the two-process behaviour is in ``tests/distributed/test_trainer_ddp.py``."""

from __future__ import annotations

import pytest

from ember.errors import MisconfigurationError
from ember.trainer.epoch_sync import Description, check_agreement


def entry(
    key: str,
    reduce_fx: str = "mean",
    dataloader_idx: int | None = None,
    in_batch: bool = True,
    metric_path: str | None = None,
) -> Description:
    return Description(
        key, key, False, True, reduce_fx, False, True, dataloader_idx, in_batch, metric_path
    )


def check(*every: list[Description]) -> None:
    union: dict[str, Description] = {}
    for entries in every:
        for description in entries:
            union.setdefault(description.key, description)
    check_agreement(list(every), union)


def test_a_rank_that_ran_no_batch_of_a_loader_is_excused() -> None:
    check([entry("loss")], [])
    check(
        [entry("a", dataloader_idx=0), entry("b", dataloader_idx=1)],
        [entry("a", dataloader_idx=0)],
    )
    check([entry("acc", "metric", metric_path="accuracy")], [])


def test_a_rank_that_ran_batches_must_log_every_batch_name() -> None:
    with pytest.raises(MisconfigurationError, match=r"'b' on ranks \[0\] but not on ranks \[1\]"):
        check([entry("a"), entry("b")], [entry("a")])


def test_an_epoch_hook_name_must_be_on_every_rank() -> None:
    with pytest.raises(MisconfigurationError, match=r"'end' on ranks \[1\] but not on ranks \[0\]"):
        check([], [entry("end", in_batch=False)])


def test_a_metric_a_rank_cannot_find_is_an_error() -> None:
    with pytest.raises(MisconfigurationError, match="not a submodule of the module"):
        check([entry("acc", "metric")], [])


def test_reductions_must_agree() -> None:
    with pytest.raises(MisconfigurationError, match=r"'x' \(rank 0: min, rank 1: max\)"):
        check([entry("x", "min")], [entry("x", "max")])
