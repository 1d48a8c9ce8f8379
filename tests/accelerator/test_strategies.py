"""Strategy arguments and the settings that choose them, in one process: each bad value is a
clear MisconfigurationError naming what was given and what is accepted."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ember import Accelerator, DDPStrategy, DistributedType, MisconfigurationError
from ember.accelerator import distributed


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"find_unused_parameters": "yes"}, ["find_unused_parameters='yes'", "True or False"]),
        ({"static_graph": 1}, ["static_graph=1", "True or False"]),
        ({"timeout": -5}, ["timeout=-5", "timedelta"]),
        ({"timeout": timedelta(0)}, ["timeout=", "> 0"]),
        ({"timeout": "30m"}, ["timeout='30m'"]),
    ],
)
def test_bad_ddp_strategy_arguments(kwargs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(MisconfigurationError) as caught:
        DDPStrategy(**kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_timeout_in_seconds_is_accepted() -> None:
    assert DDPStrategy(timeout=90).timeout == timedelta(seconds=90)


def test_a_bad_ember_strategy_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_STRATEGY", "deepspeed")
    with pytest.raises(MisconfigurationError) as caught:
        Accelerator(cpu=True)
    message = str(caught.value)
    assert "EMBER_STRATEGY='deepspeed'" in message
    for accepted in ("'no'", "'ddp'", "'fsdp'"):
        assert accepted in message


@pytest.mark.parametrize("value", ["no", "auto", "ddp"])
def test_ember_strategy_in_one_process_is_one_device(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("EMBER_STRATEGY", value)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    assert accelerator.distributed_type is DistributedType.NO


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_a_bad_collective_timeout_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("EMBER_COLLECTIVE_TIMEOUT", value)
    with pytest.raises(MisconfigurationError, match=f"EMBER_COLLECTIVE_TIMEOUT='{value}'"):
        distributed.collective_timeout(None)


def test_the_collective_timeout_environment_variable_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert distributed.collective_timeout(timedelta(minutes=5)) == timedelta(minutes=5)
    assert distributed.collective_timeout(None) == timedelta(minutes=30)
    monkeypatch.setenv("EMBER_COLLECTIVE_TIMEOUT", "12.5")
    assert distributed.collective_timeout(timedelta(minutes=5)) == timedelta(seconds=12.5)


def test_the_agreement_of_one_process_answers_at_once() -> None:
    agreement = Accelerator(cpu=True).agreement()
    assert agreement.exchange(True) is True
    assert agreement.exchange(False) is False
    assert agreement.exchange(2) == 2  # the Trainer's "preempted" vote
    assert agreement.now(True) == 1
    assert agreement.now(0) == 0
    assert agreement.settle() == 0
