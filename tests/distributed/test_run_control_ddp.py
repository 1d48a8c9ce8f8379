"""Run control in two real processes: every rank decides alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.launching import run_two_processes

SCRIPT = Path(__file__).with_name("run_control_scenarios.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("run_control_ddp")
    run_two_processes(SCRIPT, str(out), EMBER_COLLECTIVE_TIMEOUT="60")
    results: list[dict[str, Any]] = json.loads((out / "results.json").read_text())
    return results


def test_min_steps_holds_off_a_stop_asked_on_one_rank(ranks: list[dict[str, Any]]) -> None:
    # Rank 0 asks at every step; both ranks go on to step 5 and stop there together.
    assert [rank["min_steps"] for rank in ranks] == [[5, 0, True], [5, 0, True]]


def test_max_time_on_one_rank_stops_both_together(ranks: list[dict[str, Any]]) -> None:
    # Rank 1 passes the limit after step 2; agreed one step later, on both ranks.
    assert [rank["max_time"] for rank in ranks] == [[3, 0, True], [3, 0, True]]


def test_estimated_stepping_batches_counts_this_rank_share(ranks: list[dict[str, Any]]) -> None:
    # 16 batches shared by 2 ranks: 8 each, in windows of 3 (3, 3, 2) -> 3 steps x 2 epochs.
    assert [rank["estimate"] for rank in ranks] == [[6, 6], [6, 6]]


def test_simple_profiler_prints_once_and_reports_collectives(ranks: list[dict[str, Any]]) -> None:
    # Rank 0 prints the table, rank 1 nothing. Rank 1 is late (10 ms per step, 300 ms at each
    # epoch end): rank 0 waits for it at the vote between epochs (collectives) and in
    # backward (DDP's all-reduce); rank 1's time is in its forward and its hook.
    assert [rank["profile"]["tables"] for rank in ranks] == [1, 0]
    fast, slow = (rank["profile"]["shares"] for rank in ranks)
    for shares in (fast, slow):
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert fast["collectives"] > 0.3 > slow["collectives"]
    assert fast["backward"] > slow["backward"]
    assert slow["callbacks"] > 0.3 > fast["callbacks"]
    assert slow["forward"] > fast["forward"]
