"""find_executable_batch_size: halves the batch size on out-of-memory errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ember
from ember import MisconfigurationError, find_executable_batch_size


def fails_above(limit: int, error: BaseException, tried: list[int]) -> Any:
    def train(batch_size: int, scale: int = 1) -> int:
        tried.append(batch_size)
        if batch_size > limit:
            raise error
        return batch_size * scale

    return train


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_halves_until_it_fits(error: BaseException) -> None:
    tried: list[int] = []
    train = find_executable_batch_size(fails_above(20, error, tried), starting_batch_size=100)
    assert train() == 12
    assert tried == [100, 50, 25, 12]


def test_decorator_form_with_arguments() -> None:
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=64)
    def train(batch_size: int, scale: int) -> int:
        tried.append(batch_size)
        if batch_size > 16:
            raise torch.OutOfMemoryError("out of memory")
        return batch_size * scale

    assert train(3) == 48 and train(scale=2) == 32
    assert tried == [64, 32, 16, 64, 32, 16]
    assert train.__name__ == "train"
    assert ember.find_executable_batch_size is find_executable_batch_size


def test_default_start_is_128() -> None:
    tried: list[int] = []
    find_executable_batch_size(fails_above(1000, RuntimeError("x"), tried))()
    assert tried == [128]


def test_reaching_zero_is_a_clear_error() -> None:
    tried: list[int] = []
    train = find_executable_batch_size(
        fails_above(0, torch.OutOfMemoryError("out of memory"), tried), starting_batch_size=4
    )
    with pytest.raises(RuntimeError, match=r"every batch size from 4 down to 1.*reached zero"):
        train()
    assert tried == [4, 2, 1]


def test_other_errors_pass_through() -> None:
    tried: list[int] = []
    error = ValueError("bad shape")
    train = find_executable_batch_size(fails_above(0, error, tried), starting_batch_size=8)
    with pytest.raises(ValueError, match="bad shape"):
        train()
    assert tried == [8]
    other = RuntimeError("expected scalar type Float")
    with pytest.raises(RuntimeError, match="expected scalar"):
        find_executable_batch_size(fails_above(0, other, []), starting_batch_size=8)()


def test_frees_memory_between_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    freed: list[int] = []
    monkeypatch.setattr("ember.batch_size.free_memory", lambda: freed.append(1))
    find_executable_batch_size(
        fails_above(2, torch.OutOfMemoryError("out of memory"), []), starting_batch_size=8
    )()
    assert len(freed) == 2


def test_misuse() -> None:
    train = find_executable_batch_size(lambda batch_size: batch_size, starting_batch_size=8)
    with pytest.raises(TypeError, match="without the batch size"):
        train(8)
    with pytest.raises(MisconfigurationError, match="starting_batch_size=0"):
        find_executable_batch_size(starting_batch_size=0)(lambda batch_size: batch_size)


@pytest.mark.gpu
def test_real_cuda_out_of_memory_halves() -> None:
    free, _ = torch.cuda.mem_get_info()
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=64)
    def allocate(batch_size: int) -> int:
        tried.append(batch_size)
        # batch_size / 16 of all free memory, in float32: fits from 8 down.
        block = torch.empty(free * batch_size // 16 // 4, dtype=torch.float32, device="cuda")
        del block
        return batch_size

    result = allocate()
    assert result <= 8 and tried == [64 >> halvings for halvings in range(len(tried))]
