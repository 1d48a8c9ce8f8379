"""FSDPStrategy: one real two-process launch of ``fsdp_scenarios.py`` (gloo on 127.0.0.1)
compared with one process and batch N x B, plus the argument checks in one process."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ember import Accelerator, FSDPStrategy, MisconfigurationError, Trainer
from tests.distributed.launching import run_two_processes

SCRIPT = Path(__file__).with_name("fsdp_scenarios.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp")
    run_two_processes(SCRIPT, str(out))
    loaded: dict[str, Any] = json.loads((out / "results.json").read_text())
    return loaded


# --- two processes -------------------------------------------------------------------------


def test_the_module_is_sharded_per_block_and_at_the_root(results: dict[str, Any]) -> None:
    assert results["distributed_type"] == "FSDP"
    assert results["pads_evaluation"] is True
    assert results["param_types"] == ["DTensor"]
    assert results["sharded_blocks"] == [True, True, True]  # each child of the ModuleList
    assert results["root_sharded"] is True


def test_trains_to_the_weights_of_one_process_with_the_big_batch(results: dict[str, Any]) -> None:
    # SGD with momentum; the optimizer was built before prepare, over unsharded parameters.
    assert results["plain_diff"] < 1e-6


def test_accumulation_and_clipping_equal_one_process(results: dict[str, Any]) -> None:
    assert results["accumulation_diff"] < 1e-6
    expected = results["expected_norms"]
    assert len(expected) == 4
    for rank in (0, 1):  # every process gets the global norm of the whole gradient
        assert results[f"norms_rank{rank}"] == pytest.approx(expected, rel=1e-6)


def test_save_model_writes_consolidated_full_weights(results: dict[str, Any]) -> None:
    # Read back with plain safetensors.torch.load_file in the script.
    assert results["saved_diff"] < 1e-6
    assert "blocks.0.linear.weight" in results["saved_keys"]
    assert results["full_state_dict_empty_on_rank1"] is True


def test_full_optimizer_state_and_loading_full_weights(results: dict[str, Any]) -> None:
    assert results["optimizer_state_keys"] == results["saved_keys"]
    assert results["momentum_shapes_full"] is True
    assert results["loaded_zeros"] is True


def test_shard_modules_none_follows_no_split_modules(results: dict[str, Any]) -> None:
    assert results["no_split_sharded"] == {
        "": True,
        "embed": False,
        "first": True,
        "second": True,
        "heads.0": False,  # a ModuleList, but _no_split_modules decides
        "heads.1": False,
    }


def test_explicit_shard_modules(results: dict[str, Any]) -> None:
    assert results["explicit_sharded"] == [
        "",
        "blocks.0.linear",
        "blocks.1.linear",
        "blocks.2.linear",
        "embed",
        "head",
    ]
    assert results["explicit_forward_shape"] == [3, 1]


def test_bf16_mixed_gathers_bf16_weights_and_trains(results: dict[str, Any]) -> None:
    assert results["bf16_weight_dtype_in_forward"] == ["torch.bfloat16"]
    assert results["bf16_saved_dtypes"] == ["torch.float32"]  # the sharded weights stay fp32
    assert results["bf16_diff"] < 2e-2


def test_fp16_skips_together_when_one_shard_overflows(results: dict[str, Any]) -> None:
    skipped = results["fp16_skipped_rank0"]
    assert skipped == results["fp16_skipped_rank1"]
    assert skipped[4] is True  # an inf only in rank 1's shard
    assert skipped[3] is False and skipped[5] is False
    assert results["fp16_finite_rank0"] and results["fp16_finite_rank1"]


def test_trainer_fit_under_fsdp(results: dict[str, Any]) -> None:
    assert results["trainer_distributed_type"] == "FSDP"
    # accumulate_grad_batches=2 and gradient_clip_val=0.5, against one process.
    assert results["trainer_diff"] < 1e-6
    assert math.isfinite(results["trainer_val_loss"])  # validation ran through the sharded root
    # validate() after fit() on the same sharded module (it used to shard it twice and fail).
    assert results["trainer_validate_after_fit"] == results["trainer_val_loss"]
    [warning] = results["trainer_warnings"]
    assert "10 samples" in warning and "= 8" in warning


# --- one process -----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(2, 1)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("Block", "shard_modules='Block'"),
        (Block, "shard_modules=<class"),
        ([3], "3 is neither"),
        ([""], "'' is neither"),
        ([int], "neither an nn.Module subclass"),
    ],
)
def test_bad_shard_modules(value: Any, fragment: str) -> None:
    with pytest.raises(MisconfigurationError, match="shard_modules") as caught:
        FSDPStrategy(shard_modules=value)
    assert fragment in str(caught.value)
    assert "list of nn.Module subclasses or class names" in str(caught.value)


def test_shard_modules_absent_from_the_model_lists_its_classes() -> None:
    strategy = FSDPStrategy(shard_modules=["Block", "Decoder", nn.Conv2d])
    with pytest.raises(MisconfigurationError) as caught:
        strategy.blocks_of(Model())
    message = str(caught.value)
    assert "'Decoder', Conv2d" in message
    assert "Block, Linear, Model, ModuleList" in message


def test_blocks_rule_without_a_process_group() -> None:
    model = Model()
    assert FSDPStrategy().blocks_of(model) == list(model.blocks)[::-1]
    assert FSDPStrategy(shard_modules=[Block]).blocks_of(model) == list(model.blocks)[::-1]
    linears = FSDPStrategy(shard_modules=["Linear"]).blocks_of(model)
    assert linears == [model.head, model.blocks[1].linear, model.blocks[0].linear]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"reshard_after_forward": "yes"}, "reshard_after_forward='yes'"),
        ({"timeout": -1}, "timeout=-1"),
        ({"timeout": "1h"}, "timedelta"),
    ],
)
def test_bad_flags_and_timeout(arguments: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MisconfigurationError, match="FSDPStrategy") as caught:
        FSDPStrategy(**arguments)
    assert fragment in str(caught.value)


def test_fsdp_in_one_process_is_one_device() -> None:
    strategy = FSDPStrategy(timeout=timedelta(minutes=5))
    accelerator = Accelerator(cpu=True, strategy=strategy)
    model = nn.Linear(2, 1)
    assert accelerator.prepare(model) is model
    assert str(accelerator.distributed_type) == "NO"
    assert accelerator.pads_evaluation is False
    assert set(accelerator.get_state_dict(model)) == {"weight", "bias"}
    assert isinstance(Accelerator(cpu=True, strategy="fsdp").strategy, FSDPStrategy)
    trainer = Trainer(strategy="fsdp", accelerator="cpu", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.accelerator.strategy, FSDPStrategy)
    assert torch.equal(accelerator.get_state_dict(model)["weight"], model.weight)


def test_checkpoints_resume_exactly_and_hold_full_weights(results: dict[str, Any]) -> None:
    from tests.distributed.fsdp_scenarios import fresh

    assert results["fsdp_resume_equal"] is True
    assert results["fsdp_checkpoint_keys"] == sorted(f"net.{name}" for name in fresh().state_dict())
    assert results["fsdp_optimizer_format"] == "names"
