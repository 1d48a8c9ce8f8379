"""``seed_everything`` and the ``ember config`` file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ember import MisconfigurationError, seed_everything
from ember.config import config_path, load_config, save_config


def draw() -> tuple[torch.Tensor, float, np.ndarray]:
    return torch.rand(3), random.random(), np.random.rand(3)


def test_same_seed_gives_the_same_numbers() -> None:
    assert seed_everything(123) == 123
    first = draw()
    seed_everything(123)
    second = draw()
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    assert np.array_equal(first[2], second[2])


def test_another_seed_gives_other_numbers() -> None:
    seed_everything(1)
    first = draw()
    seed_everything(2)
    second = draw()
    assert not torch.equal(first[0], second[0])
    assert first[1] != second[1]
    assert not np.array_equal(first[2], second[2])


class RandomDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Each item draws from every generator a worker process has."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))])


def test_loader_workers_are_seeded_reproducibly_and_differently() -> None:
    def draw_with_workers() -> torch.Tensor:
        loader = torch.utils.data.DataLoader(RandomDataset(), batch_size=2, num_workers=2)
        return torch.cat(list(loader))

    seed_everything(42)
    first = draw_with_workers()
    seed_everything(42)
    second = draw_with_workers()
    assert torch.equal(first, second)
    # Worker 0 made rows 0-1, worker 1 rows 2-3: different streams for every generator.
    assert (first[0] != first[2]).all()


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_bounds_are_accepted(seed: int) -> None:
    assert seed_everything(seed) == seed


@pytest.mark.parametrize("seed", [-1, 2**32, "3", True, 1.0, None])
def test_bad_seeds_are_refused(seed: Any) -> None:
    with pytest.raises(MisconfigurationError, match="seed") as caught:
        seed_everything(seed)
    assert repr(seed) in str(caught.value)


# --- the config file -------------------------------------------------------------------------


def test_config_round_trip(tmp_path: Path) -> None:
    settings = {"mixed_precision": "bf16", "num_processes": 2, "nested": {"a": [1, 2]}}
    path = save_config(settings)
    assert path == config_path() == tmp_path / "ember_config.yaml"
    assert load_config() == settings


def test_config_at_an_explicit_path_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "config.yaml"
    settings = {"mixed_precision": "no"}  # "no" is a YAML boolean unless quoted
    assert save_config(settings, path) == path
    assert load_config(path) == settings
    assert load_config() == {}  # the default file was not touched


def test_config_path_default_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBER_CONFIG_FILE")
    assert config_path() == Path.home() / ".config" / "ember" / "default_config.yaml"


def test_missing_or_empty_config_is_empty(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.yaml") == {}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == {}


@pytest.mark.parametrize(
    ("content", "complaint"),
    [("a: [1, 2\n", "not valid YAML"), ("just a string\n", "mapping"), ("- 1\n", "mapping")],
)
def test_bad_config_file_is_a_misconfiguration(
    tmp_path: Path, content: str, complaint: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(MisconfigurationError, match=complaint) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
