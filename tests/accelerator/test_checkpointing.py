"""``Accelerator.save_state`` / ``load_state`` / ``register_for_checkpointing`` / ``save`` and
``TrainModule.load_from_checkpoint``.

The promise (SPEC §5): a hand-written loop resumed with ``load_state`` and
``skip_first_batches`` at the step ``save_state`` saved, mid-epoch included, ends with the same
weights as the loop that was never interrupted. The resumed run is a new process in all but
name: reseeded differently, every object rebuilt, a new Accelerator.

Run as a script (``torchrun --nproc_per_node 2 this_file.py out.json``), this file is the
two-process scenario of ``test_two_processes_resume_exactly``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ember
from ember import (
    Accelerator,
    CheckpointError,
    DataLoaderConfiguration,
    MisconfigurationError,
    Trainer,
    TrainModule,
)
from ember.accelerator import distributed
from tests.helpers import TinyModule, bare_trainer_kwargs, loader

EPOCHS = 3
SAMPLES = 40  # 10 batches of 4 per epoch (per process: 5 of them with two processes)

NO_GENERATORS = {"loader": None, "sampler": None}


class Progress:
    """The loop's own position, registered so that ``save_state`` keeps it."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0  # consumed in ``epoch``

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.batches = state["batches"]


def build(samples: int = SAMPLES) -> tuple[nn.Module, Any, Any, DataLoader]:
    """A model with Dropout, AdamW, a scheduler and a shuffled loader without a generator:
    every random draw comes from the generators ``seed_everything`` seeds."""
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.8)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(samples, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return model, optimizer, scheduler, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


def train(
    project_dir: Path,
    *,
    seed: int = 0,
    mixed_precision: str = "no",
    seedable: bool = False,
    stop_at: tuple[int, int] | None = None,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Accelerate's recipe. ``stop_at=(epoch, batches)``: save_state after that many batches
    of that epoch and stop. ``resume``: load_state, then continue where it stopped."""
    ember.seed_everything(seed + distributed.global_rank())
    accelerator = Accelerator(
        cpu=True,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=2,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seedable),
        project_dir=project_dir,
    )
    model, optimizer, scheduler, batches = accelerator.prepare(*build())
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume:
        accelerator.load_state()
    for epoch in range(progress.epoch, EPOCHS):
        epoch_batches = batches
        if progress.batches:  # resumed mid-epoch: leave out what was consumed
            epoch_batches = accelerator.skip_first_batches(batches, progress.batches)
        for x, y in epoch_batches:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.batches += 1
            if (epoch, progress.batches) == stop_at:
                accelerator.save_state()
                return None
        progress.epoch, progress.batches = epoch + 1, 0
    accelerator.end_training()
    return {
        "weights": {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
        "lr": scheduler.get_last_lr(),
        "scaler": accelerator.precision.state_dict(),
    }


def assert_same_run(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert expected["weights"].keys() == got["weights"].keys()
    for name, value in expected["weights"].items():
        assert torch.equal(value, got["weights"][name]), name
    assert expected["lr"] == got["lr"]
    assert expected["scaler"] == got["scaler"]


# --- the promise ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:precision '16-mixed' on this CPU")
@pytest.mark.parametrize(
    ("mixed_precision", "seedable", "stop_at"),
    [
        ("no", False, (1, 6)),  # mid-epoch, at a window boundary
        ("no", False, (0, 10)),  # after an epoch's last batch
        ("fp16", False, (1, 4)),  # GradScaler("cpu"); it skips steps and backs off here
        ("no", True, (2, 2)),  # use_seedable_sampler: its seed was drawn at prepare time
    ],
)
def test_resumed_loop_gives_the_same_weights(
    tmp_path: Path, mixed_precision: str, seedable: bool, stop_at: tuple[int, int]
) -> None:
    options = {"mixed_precision": mixed_precision, "seedable": seedable}
    expected = train(tmp_path / "whole", **options)
    assert train(tmp_path / "resumed", stop_at=stop_at, **options) is None
    got = train(tmp_path / "resumed", seed=1234, resume=True, **options)
    assert expected is not None and got is not None
    assert_same_run(expected, got)
    if mixed_precision == "fp16":
        assert expected["scaler"]["scale"] < 2.0**16  # steps were skipped: the state matters


@pytest.mark.parametrize("forget", ["process", "loader"])
def test_resuming_without_the_saved_random_states_would_differ(tmp_path: Path, forget: str) -> None:
    # The promise test is sensitive: the same loop resumed from a state whose process random
    # state, or whose loader's record of the random state its epoch began from, is taken out
    # of play ends with other weights (other dropout masks; another order).
    expected = train(tmp_path / "whole")
    train(tmp_path / "resumed", stop_at=(1, 6))
    path = tmp_path / "resumed" / "checkpoints" / "checkpoint_0"
    state = torch.load(path / "state.pt", weights_only=True)
    if forget == "process":
        ember.seed_everything(1234)
        state["ranks"][0]["rng"]["torch"] = torch.get_rng_state()
    else:
        state["ranks"][0]["loaders"][0]["rng"] = None
    torch.save(state, path / "state.pt")
    got = train(tmp_path / "resumed", seed=1234, resume=True)
    assert expected is not None and got is not None
    assert not all(torch.equal(v, got["weights"][k]) for k, v in expected["weights"].items())


def test_iterating_the_plain_loader_after_load_state_replays_the_saved_epoch(
    tmp_path: Path,
) -> None:
    def loader_of_twelve() -> DataLoader:
        return DataLoader(list(range(12)), batch_size=3, shuffle=True)

    ember.seed_everything(0)
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    batches = accelerator.prepare(loader_of_twelve())
    epoch = []
    for index, batch in enumerate(batches):
        epoch.append(batch.tolist())
        if index == 1:
            accelerator.save_state()
    ember.seed_everything(7)
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    batches = accelerator.prepare(loader_of_twelve())
    accelerator.load_state()
    assert [batch.tolist() for batch in batches] == epoch


# --- what is written -----------------------------------------------------------------------------
def prepared(tmp_path: Path, **kwargs: Any) -> tuple[Accelerator, nn.Module, Any]:
    ember.seed_everything(0)
    accelerator = Accelerator(cpu=True, project_dir=tmp_path, **kwargs)
    model, optimizer, scheduler, batches = accelerator.prepare(*build())
    for x, y in batches:
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return accelerator, model, optimizer


def test_save_state_writes_a_checked_directory(tmp_path: Path) -> None:
    accelerator, model, _ = prepared(tmp_path)
    path = accelerator.save_state()
    assert path == tmp_path / "checkpoints" / "checkpoint_0"
    assert sorted(entry.name for entry in path.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "state.pt",
    ]
    weights = safetensors.torch.load_file(str(path / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(weights[name], value)
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["world_size"] == 1
    assert state["num_models"] == 1 and state["models"] == []
    assert state["optimizers"][0]["state"][0]["exp_avg"].shape == (16, 4)
    assert state["schedulers"][0]["last_epoch"] == 10
    assert state["ranks"][0]["loaders"] == [
        {"epoch": 1, "batches": 0, "rng": None, "data_seed": None, "generators": NO_GENERATORS}
    ]
    assert set(state["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["ember_version"] == ember.__version__
    assert meta["world_size"] == 1
    # The next automatic name is the next number; an explicit one is used as given.
    assert accelerator.save_state() == tmp_path / "checkpoints" / "checkpoint_1"
    assert accelerator.save_state(tmp_path / "mine") == tmp_path / "mine"


def test_several_models_are_saved_and_restored_in_order(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    first, second = accelerator.prepare(nn.Linear(2, 3), nn.Linear(3, 1))
    path = accelerator.save_state()
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (first, second)]
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    first, second = accelerator.prepare(nn.Linear(2, 3), nn.Linear(3, 1))
    assert accelerator.load_state() == path
    for model, weights in zip((first, second), saved, strict=True):
        for name, value in model.state_dict().items():
            assert torch.equal(value, weights[name])


def test_load_state_picks_the_highest_number(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    model = accelerator.prepare(nn.Linear(2, 1))
    for number in (2, 10, 9):
        with torch.no_grad():
            model.weight.fill_(number)
        accelerator.save_state(tmp_path / "checkpoints" / f"checkpoint_{number}")
    assert accelerator.save_state().name == "checkpoint_11"
    (tmp_path / "checkpoints" / "checkpoint_11" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="checkpoint_11.*model.safetensors is missing"):
        accelerator.load_state()  # the newest, damaged, is reported: never an older one
    accelerator.save_state(tmp_path / "checkpoints" / "checkpoint_11")  # replaced whole
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state()
    assert model.weight.eq(9).all()  # checkpoint_11 was written from weights filled with 9


def test_a_pending_scaler_update_is_applied_before_saving(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="fp16", project_dir=tmp_path)
    model = accelerator.prepare(nn.Linear(2, 1))
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    accelerator.backward(model(torch.ones(1, 2)).sum())
    model.weight.grad[0, 0] = float("inf")  # the step is skipped; the update would halve
    optimizer.step()
    path = accelerator.save_state()
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0**15


def test_save_state_mid_window_warns(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, project_dir=tmp_path)
    model = accelerator.prepare(nn.Linear(2, 1))
    with accelerator.accumulate(model):
        accelerator.backward(model(torch.ones(1, 2)).sum())
    with pytest.warns(UserWarning, match="open accumulation window"):
        accelerator.save_state()


# --- registered objects --------------------------------------------------------------------------
def test_registered_objects_round_trip(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    progress = Progress()
    progress.epoch, progress.batches = 3, 7
    accelerator.register_for_checkpointing(progress)
    accelerator.save_state()
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    restored = Progress()
    accelerator.register_for_checkpointing(restored)
    accelerator.load_state()
    assert restored.state_dict() == {"epoch": 3, "batches": 7}


def test_register_refuses_objects_without_state_dict() -> None:
    with pytest.raises(MisconfigurationError, match="these have not both: int, object"):
        Accelerator(cpu=True).register_for_checkpointing(Progress(), 3, object())


class Unsaveable:
    def state_dict(self) -> dict[str, Any]:
        return {"fn": lambda: 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_a_state_that_cannot_be_saved_fails_before_anything_is_written(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    accelerator.prepare(nn.Linear(2, 1))
    accelerator.register_for_checkpointing(Unsaveable())
    with pytest.raises(
        CheckpointError, match=r"registered object 0 \(Unsaveable\).*\['fn'\] is a function"
    ):
        accelerator.save_state()
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(CheckpointError, match="Unsaveable"):
        accelerator.save_state(tmp_path / "explicit")
    assert list(tmp_path.iterdir()) == []


def test_save_state_never_replaces_a_folder_holding_other_files(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    accelerator.prepare(nn.Linear(2, 1))
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"holds other files \(notes.txt\)"):
        accelerator.save_state(tmp_path / "outputs")
    assert (tmp_path / "outputs" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="it is a file"):
        accelerator.save_state(tmp_path / "file")


# --- bad checkpoints -----------------------------------------------------------------------------
def test_a_different_number_of_processes_is_refused(tmp_path: Path) -> None:
    accelerator, _, _ = prepared(tmp_path)
    path = accelerator.save_state()
    state = torch.load(path / "state.pt", weights_only=True)
    state["world_size"] = 2
    torch.save(state, path / "state.pt")
    with pytest.raises(CheckpointError, match="written by 2 processes and this run has 1"):
        prepared(tmp_path)[0].load_state(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: (path / "model.safetensors").unlink(), "model.safetensors is missing"),
        (
            lambda path: (path / "model.safetensors").write_bytes(
                (path / "model.safetensors").read_bytes()[:50]
            ),
            "model.safetensors' is truncated or corrupt",
        ),
        (lambda path: (path / "state.pt").write_bytes(b"not a zip"), "state.pt' is truncated"),
    ],
)
def test_damaged_files_are_reported_and_nothing_changes(
    tmp_path: Path, damage: Any, message: str
) -> None:
    accelerator, model, _ = prepared(tmp_path)
    path = accelerator.save_state()
    damage(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        changed = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        accelerator.load_state(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in changed.items())
    assert not all(torch.equal(v, changed[k]) for k, v in before.items())


def test_the_weights_of_another_model_list_their_keys(tmp_path: Path) -> None:
    accelerator, _, _ = prepared(tmp_path)
    path = accelerator.save_state()
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    other = Accelerator(cpu=True)
    other.prepare(model, optimizer, scheduler, build()[3])
    with pytest.raises(
        CheckpointError,
        match=r"prepared model 0 \(Sequential\): missing keys \['1.bias', '1.weight'\], "
        r"unexpected keys \['3.bias', '3.weight'\]",
    ):
        other.load_state(path)


def test_a_count_mismatch_names_both_counts_before_anything_changes(tmp_path: Path) -> None:
    accelerator, _, _ = prepared(tmp_path)
    path = accelerator.save_state()
    ember.seed_everything(1)
    model, optimizer, _, batches = build()
    other = Accelerator(cpu=True)
    model, optimizer, batches = other.prepare(model, optimizer, batches)  # no scheduler
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointError, match="state of 1 prepared schedulers; this accelerator has 0"
    ):
        other.load_state(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    again, _, _ = prepared(tmp_path / "again")
    again.register_for_checkpointing(Progress())
    with pytest.raises(CheckpointError, match="0 registered objects; this accelerator has 1"):
        again.load_state(path)


def test_load_state_without_a_checkpoint_or_from_a_trainer_checkpoint(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, project_dir=tmp_path)
    with pytest.raises(CheckpointError, match="found no checkpoint_<n> directory"):
        accelerator.load_state()
    trainer = Trainer(max_epochs=1, **bare_trainer_kwargs())
    trainer.fit(TinyModule(), loader(16))
    path = trainer.save_checkpoint(tmp_path / "trainer")
    with pytest.raises(CheckpointError, match="not written by Accelerator.save_state"):
        accelerator.load_state(path)


# --- save ----------------------------------------------------------------------------------------
def test_save_writes_one_file_atomically(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.save({"a": torch.ones(2)}, tmp_path / "obj.pt") is None
    assert torch.equal(torch.load(tmp_path / "obj.pt")["a"], torch.ones(2))
    accelerator.save({"a": torch.zeros(2)}, tmp_path / "obj.safetensors", safe_serialization=True)
    loaded = safetensors.torch.load_file(str(tmp_path / "obj.safetensors"))
    assert torch.equal(loaded["a"], torch.zeros(2))
    with pytest.raises(Exception, match="lambda|local object|pickle"):
        accelerator.save({"fn": lambda: 1}, tmp_path / "obj.pt")
    assert torch.equal(torch.load(tmp_path / "obj.pt")["a"], torch.ones(2))  # the old one
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["obj.pt", "obj.safetensors"]


# --- TrainModule.load_from_checkpoint ------------------------------------------------------------
class Regressor(TinyModule):
    def __init__(self, features: int = 4, hidden: int = 8, lr: float = 0.1, tag: str = "a") -> None:
        super().__init__(features, hidden, lr)
        self.save_hyperparameters()


class Other(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 1)


def fitted_checkpoint(tmp_path: Path, weights_only: bool = False) -> tuple[Regressor, Path]:
    module = Regressor(hidden=6, tag="b")
    trainer = Trainer(max_epochs=1, **bare_trainer_kwargs())
    trainer.fit(module, loader(16))
    return module, trainer.save_checkpoint(tmp_path / "ckpt", weights_only=weights_only)


@pytest.mark.parametrize("weights_only", [False, True])
def test_load_from_checkpoint_builds_the_module_from_its_hparams(
    tmp_path: Path, weights_only: bool
) -> None:
    trained, path = fitted_checkpoint(tmp_path, weights_only)
    loaded = Regressor.load_from_checkpoint(path)
    assert isinstance(loaded, Regressor)
    assert dict(loaded.hparams) == {"features": 4, "hidden": 6, "lr": 0.1, "tag": "b"}
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.cpu())
    assert loaded.training  # as Lightning: call .eval() for inference


def test_load_from_checkpoint_overrides_win(tmp_path: Path) -> None:
    _, path = fitted_checkpoint(tmp_path)
    loaded = Regressor.load_from_checkpoint(path, lr=0.5)
    assert loaded.hparams.lr == 0.5 and loaded.lr == 0.5 and loaded.hparams.hidden == 6
    with pytest.raises(MisconfigurationError, match=r"got \['lrr'\], which are not arguments"):
        Regressor.load_from_checkpoint(path, lrr=0.5)
    with pytest.raises(
        CheckpointError, match=r"(?s)does not fit Regressor.*size mismatch for net.0"
    ):
        Regressor.load_from_checkpoint(path, hidden=3)  # the same keys, other shapes


def test_load_from_checkpoint_of_another_module_lists_the_keys(tmp_path: Path) -> None:
    _, path = fitted_checkpoint(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"does not fit Other: missing keys \['body.bias', 'body.weight'\], unexpected "
        r"keys \['net.0.bias', 'net.0.weight', 'net.2.bias', 'net.2.weight'\]",
    ):
        Other.load_from_checkpoint(path)


def test_load_from_checkpoint_needs_the_arguments_hparams_lack(tmp_path: Path) -> None:
    class Required(TrainModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.net = nn.Linear(4, width)

    trainer_module = Required(1)
    path = tmp_path / "weights"
    from ember.checkpoint.files import write_checkpoint

    write_checkpoint(path, trainer_module.state_dict(), {"hparams": {}}, {})
    with pytest.raises(MisconfigurationError, match=r"no value for \['width'\]"):
        Required.load_from_checkpoint(path)
    assert isinstance(Required.load_from_checkpoint(path, width=1), Required)
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        Required.load_from_checkpoint(tmp_path / "nowhere")


# --- two processes -------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path: Path) -> None:
    from tests.distributed.launching import ROOT, run_two_processes

    out = tmp_path / "result.json"
    # The processes import the ember this test imported (a relative PYTHONPATH would not
    # survive the test's change of folder).
    path = os.pathsep.join([str(ROOT), str(Path(ember.__file__).parents[1])])
    run_two_processes(Path(__file__), str(tmp_path), str(out), PYTHONPATH=path)
    assert json.loads(out.read_text()) == {"same_weights": True, "ranks_differ": True}
    # Written by two processes: one process refuses it, naming both counts.
    accelerator, _, _ = prepared(tmp_path / "one")
    with pytest.raises(CheckpointError, match="written by 2 processes and this run has 1"):
        accelerator.load_state(tmp_path / "resumed" / "checkpoints" / "checkpoint_0")


def two_process_scenario(folder: Path, out: Path) -> None:
    """Every rank seeds differently (its dropout masks differ), so each rank's own random
    state must come back; the loader is sharded."""
    expected = train(folder / "whole")
    train(folder / "resumed", stop_at=(1, 2))
    got = train(folder / "resumed", seed=1234, resume=True)
    assert expected is not None and got is not None
    state = torch.load(
        folder / "resumed" / "checkpoints" / "checkpoint_0" / "state.pt", weights_only=True
    )
    ranks = state["ranks"]
    result = {
        "same_weights": all(
            torch.equal(v, got["weights"][k]) for k, v in expected["weights"].items()
        ),
        "ranks_differ": not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"]),
    }
    if distributed.global_rank() == 0:
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    two_process_scenario(Path(sys.argv[1]), Path(sys.argv[2]))
