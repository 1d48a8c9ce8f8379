"""Checkpoints of a DDP fit in two real processes (gloo on 127.0.0.1), one launch of
``checkpoint_scenarios.py``: exact resume on two processes, and a mid-epoch checkpoint
continued on another number of processes (2 -> 1, 1 -> 2) with every sample of the epoch
seen exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ember
from ember import Trainer
from tests.distributed.checkpoint_scenarios import SAMPLES, Crash, Net, options, shuffled
from tests.distributed.launching import run_two_processes

SCRIPT = Path(__file__).with_name("checkpoint_scenarios.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list]:
    out = tmp_path_factory.mktemp("checkpoints_ddp")
    # A one-process checkpoint, mid-epoch (epoch 1, two batches of 8 done), for 1 -> 2.
    ember.seed_everything(0)
    module = Net()
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(callbacks=[Crash(8, out / "one_to_two")], **options(max_epochs=2)).fit(
            module, shuffled(8)
        )
    run_two_processes(SCRIPT, str(out), EMBER_COLLECTIVE_TIMEOUT="60")
    results = json.loads((out / "results.json").read_text())
    return out, results, module.seen


@pytest.fixture(scope="module")
def uninterrupted() -> list[torch.Tensor]:
    """One process with the global batch (8) never interrupted: the reference weights."""
    ember.seed_everything(0)
    module = Net()
    Trainer(**options(max_epochs=2)).fit(module, shuffled(8))
    return [tensor.clone() for tensor in module.state_dict().values()]


def _epoch_one(seen: list[Any]) -> list[int]:
    return [int(index) for epoch, index in seen if epoch == 1]


def test_resume_on_two_processes_is_bit_exact(launched: Any) -> None:
    _, results, _ = launched
    assert results["exact"] == {"equal": True, "global_step": 6, "epoch": 2}
    assert results["exact_items"] == {"equal": True, "global_step": 6, "epoch": 2}


def test_two_processes_resumed_on_one(launched: Any, uninterrupted: list[torch.Tensor]) -> None:
    out, results, _ = launched
    before = [index for rank in results["two_to_one"]["seen"] for index in _epoch_one(rank)]
    assert len(before) == 2 * 4 * 4  # two ranks, four batches of four
    ember.seed_everything(3)
    module = Net()
    trainer = Trainer(**options(max_epochs=2))
    trainer.fit(module, shuffled(8), ckpt_path=out / "two_to_one")
    after = _epoch_one(module.seen)
    assert sorted(before + after) == list(range(SAMPLES))  # every sample exactly once
    assert trainer.global_step == 12
    for expected, got in zip(uninterrupted, module.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_one_process_resumed_on_two(launched: Any, uninterrupted: list[torch.Tensor]) -> None:
    _, results, seen_before = launched
    before = _epoch_one(seen_before)
    assert len(before) == 2 * 8
    after = [index for rank in results["one_to_two"]["seen"] for index in _epoch_one(rank)]
    assert sorted(before + after) == list(range(SAMPLES))
    assert results["one_to_two"]["global_step"] == 12
    flat = torch.tensor(results["one_to_two"]["weights"])
    expected = torch.cat([tensor.flatten() for tensor in uninterrupted])
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-6)
