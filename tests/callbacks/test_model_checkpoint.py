"""ModelCheckpoint: names, when it saves, top-k, last, atomicity, state across a resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ember import Callback, CheckpointError, MisconfigurationError, Trainer
from ember.callbacks import ModelCheckpoint
from ember.checkpoint.files import FILES, read_checkpoint
from tests.helpers import TinyModule, loader

# 64 samples in batches of 8: 8 optimizer steps per epoch.
STEPS_PER_EPOCH = 8


class ScoredModule(TinyModule):
    """Logs ``score`` = ``scores[epoch]`` in validation (and at the training epoch's end)."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("score", torch.tensor(self.scores[self.current_epoch]))

    def on_train_epoch_end(self) -> None:
        self.log("train_score", torch.tensor(self.scores[self.current_epoch]))


def make_trainer(root: Path, callback: ModelCheckpoint | None = None, **kwargs: Any) -> Trainer:
    settings: dict[str, Any] = {
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    settings.update(kwargs)
    return Trainer(callbacks=[callback] if callback is not None else None, **settings)


def names(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []


def step_of(path: str | Path) -> int:
    return int(json.loads((Path(path) / "meta.json").read_text())["step"])


# --- arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"dirpath": 3}, ["dirpath=3", "folder path"]),
        ({"filename": ""}, ["filename=''", "non-empty"]),
        ({"filename": "runs/{epoch}"}, ["filename='runs/{epoch}'", "folder separator"]),
        ({"filename": "last-{epoch}"}, ["filename='last-{epoch}'", "reserved"]),
        ({"filename": ".hidden"}, ["reserved"]),
        ({"filename": "{epoch"}, ["not a valid template"]),
        ({"filename": "x{}"}, ["must name a metric"]),
        ({"monitor": ""}, ["monitor=''", "logged metric"]),
        ({"mode": "avg"}, ["mode='avg'", "'min'", "'max'"]),
        ({"save_top_k": -2}, ["save_top_k=-2", "-1 to keep every"]),
        ({"save_top_k": 1.5}, ["save_top_k=1.5"]),
        ({"save_last": "yes"}, ["save_last='yes'", "True, False or None"]),
        ({"every_n_train_steps": 0}, ["every_n_train_steps=0", ">= 1"]),
        ({"every_n_epochs": True}, ["every_n_epochs=True"]),
        ({"every_n_train_steps": 2, "every_n_epochs": 1}, ["one of the two"]),
        ({"save_weights_only": 1}, ["save_weights_only=1", "True or False"]),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(MisconfigurationError) as error:
        ModelCheckpoint(**kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


# --- names -----------------------------------------------------------------------------------
def test_names_from_templates() -> None:
    values = {"epoch": 3, "step": 120, "val/loss": 0.12345, "acc": 0.5}
    assert ModelCheckpoint().format_checkpoint_name(values) == "epoch=3-step=120"
    template = ModelCheckpoint(filename="{epoch:02d}-{val/loss:.3f}-best{acc}")
    assert template.format_checkpoint_name(values) == "epoch=03-val_loss=0.123-bestacc=0.5"
    with pytest.raises(MisconfigurationError, match=r"'f1', which was not logged.*\['acc'"):
        ModelCheckpoint(filename="{f1}").format_checkpoint_name(values)
    with pytest.raises(MisconfigurationError, match="cannot format epoch=3 with 'q'"):
        ModelCheckpoint(filename="{epoch:q}").format_checkpoint_name(values)


def test_an_existing_name_gets_a_version(tmp_path: Path) -> None:
    (tmp_path / "ckpts" / "fixed").mkdir(parents=True)  # not ours: never touched
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="fixed", save_top_k=-1)
    make_trainer(tmp_path, callback, max_epochs=3).fit(TinyModule(), loader())
    assert names(tmp_path / "ckpts") == ["fixed", "fixed-v1", "fixed-v2", "fixed-v3"]
    assert list(callback.best_k_models) == [
        str(tmp_path / "ckpts" / f"fixed-v{v}") for v in (1, 2, 3)
    ]
    assert not any((tmp_path / "ckpts" / "fixed").iterdir())


def test_metric_names_with_a_slash_in_names_on_disk(tmp_path: Path) -> None:
    class SlashModule(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val/loss", torch.nn.functional.mse_loss(self(x), y))

    callback = ModelCheckpoint(
        dirpath=tmp_path / "c", filename="{epoch}-{val/loss:.2f}", monitor="val/loss"
    )
    make_trainer(tmp_path, callback, max_epochs=1).fit(SlashModule(), loader(), loader(16))
    [name] = names(tmp_path / "c")
    assert name.startswith("epoch=0-val_loss=") and len(name.split("=")[-1]) == 4
    assert callback.best_model_score is not None


# --- top k -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "kept_epochs", "best_epoch", "kth_epoch"),
    [("min", [3, 4], 3, 4), ("max", [0, 2], 0, 2)],
)
def test_top_k_by_monitor(
    tmp_path: Path, mode: str, kept_epochs: list[int], best_epoch: int, kth_epoch: int
) -> None:
    scores = [5.0, 3.0, 4.0, 1.0, 2.0]
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="score", mode=mode, save_top_k=2)
    make_trainer(tmp_path, callback, max_epochs=5).fit(ScoredModule(scores), loader(), loader(16))

    def path(epoch: int) -> str:
        return str(tmp_path / f"epoch={epoch}-step={(epoch + 1) * STEPS_PER_EPOCH}")

    assert callback.best_k_models == {path(epoch): scores[epoch] for epoch in kept_epochs}
    assert names(tmp_path) == sorted(Path(path(epoch)).name for epoch in kept_epochs)
    assert callback.best_model_path == path(best_epoch)
    assert callback.best_model_score == scores[best_epoch]
    assert callback.kth_best_model_path == path(kth_epoch)
    assert callback.last_model_path == ""


def test_save_top_k_minus_one_keeps_all_and_zero_none(tmp_path: Path) -> None:
    every = ModelCheckpoint(dirpath=tmp_path / "all", monitor="score", save_top_k=-1)
    none = ModelCheckpoint(dirpath=tmp_path / "none", monitor="score", save_top_k=0, save_last=True)
    trainer = Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[every, none],
    )
    trainer.fit(ScoredModule([2.0, 1.0, 3.0]), loader(), loader(16))
    assert len(names(tmp_path / "all")) == 3 and len(every.best_k_models) == 3
    assert every.best_model_path.endswith("epoch=1-step=16")
    assert names(tmp_path / "none") == ["last-step=24"]
    assert none.best_k_models == {} and none.best_model_path == ""
    assert none.last_model_path == str(tmp_path / "none" / "last-step=24")


def test_without_monitor_the_latest_k_are_kept(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=2)
    make_trainer(tmp_path, callback, max_epochs=4).fit(TinyModule(), loader())
    assert names(tmp_path) == ["epoch=2-step=24", "epoch=3-step=32"]
    assert callback.best_model_path == str(tmp_path / "epoch=3-step=32")
    assert callback.kth_best_model_path == str(tmp_path / "epoch=2-step=24")
    assert callback.best_model_score is None
    assert list(callback.best_k_models.values()) == [None, None]


def test_a_nan_score_is_never_the_best(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="score", save_top_k=1)
    make_trainer(tmp_path, callback, max_epochs=2).fit(
        ScoredModule([1.0, float("nan")]), loader(), loader(16)
    )
    assert callback.best_model_path.endswith("epoch=0-step=8")


def test_it_judges_what_the_module_logs_in_on_train_epoch_end(tmp_path: Path) -> None:
    # Without validation it saves at on_train_epoch_end, after the module's hook.
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="train_score")
    make_trainer(tmp_path, callback, max_epochs=3).fit(ScoredModule([3.0, 1.0, 2.0]), loader())
    assert callback.best_model_path == str(tmp_path / "epoch=1-step=16")
    assert callback.best_model_score == 1.0


def test_a_monitor_never_logged_lists_the_logged_names(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc")
    with pytest.raises(MisconfigurationError, match=r"monitor='val_acc'.*'train_loss'.*'val_loss'"):
        make_trainer(tmp_path, callback).fit(TinyModule(), loader(), loader(16))
    assert names(tmp_path) == []


# --- when it saves -----------------------------------------------------------------------------
def saved_steps(callback: ModelCheckpoint) -> list[int]:
    return [step_of(path) for path in callback.best_k_models]


def test_every_n_train_steps(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path, callback).fit(TinyModule(), loader(), loader(16))
    assert saved_steps(callback) == [3, 6, 9, 12, 15]


def test_every_n_train_steps_saves_once_per_step_with_accumulation(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, callback, accumulate_grad_batches=2).fit(TinyModule(), loader())
    assert saved_steps(callback) == [2, 4, 6, 8]
    # Saved at the window's last batch: nothing of an open window is in them.
    for path in callback.best_k_models:
        assert read_checkpoint(path, weights=False).state["loop"]["accumulation_position"] == 0


def test_every_n_epochs_without_validation(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=2, save_top_k=-1)
    make_trainer(tmp_path, callback, max_epochs=5).fit(TinyModule(), loader())
    assert names(tmp_path) == ["epoch=1-step=16", "epoch=3-step=32"]
    state = read_checkpoint(tmp_path / "epoch=1-step=16", weights=False).state
    assert state["loop"]["epoch_finished"] is True  # at the training epoch's end


def test_with_validation_it_saves_after_each_validation_not_the_sanity_check(
    tmp_path: Path,
) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    trainer = make_trainer(tmp_path, callback, val_check_interval=0.5, num_sanity_val_steps=2)
    trainer.fit(TinyModule(), loader(), loader(16))
    assert saved_steps(callback) == [4, 8, 12, 16]
    state = read_checkpoint(tmp_path / "epoch=0-step=8", weights=False).state
    assert state["loop"]["epoch_finished"] is False  # before on_train_epoch_end


def test_validate_and_test_do_not_save(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path)
    trainer = make_trainer(tmp_path, callback, max_epochs=1)
    module = TinyModule()
    trainer.validate(module, loader(16))
    trainer.test(module, loader(16))
    assert names(tmp_path) == []


# --- last ----------------------------------------------------------------------------------------
def test_save_last_hard_links_the_top_k_checkpoint_of_its_step(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(tmp_path, callback, max_epochs=3).fit(TinyModule(), loader())
    assert names(tmp_path) == ["epoch=2-step=24", "last-step=24"]  # the older ones are gone
    assert callback.last_model_path == str(tmp_path / "last-step=24")
    for name in FILES:
        assert (
            os.stat(tmp_path / "last-step=24" / name).st_ino
            == os.stat(tmp_path / "epoch=2-step=24" / name).st_ino
        )
    # The checkpoint knows itself: resuming from it finds both paths.
    saved = read_checkpoint(tmp_path / "last-step=24", weights=False).state["callbacks"]
    assert saved[callback.state_key]["last_model_path"] == callback.last_model_path
    assert saved[callback.state_key]["best_model_path"] == callback.best_model_path


def test_save_last_writes_when_no_top_k_checkpoint_was_written(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="score", save_last=True)
    make_trainer(tmp_path, callback, max_epochs=2).fit(
        ScoredModule([1.0, 2.0]), loader(), loader(16)
    )
    assert names(tmp_path) == ["epoch=0-step=8", "last-step=16"]
    assert step_of(tmp_path / "last-step=16") == 16


def test_save_last_checkpoint_returns_its_path(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path)
    trainer = make_trainer(tmp_path, callback, max_epochs=1)
    module = TinyModule()
    trainer.fit(module, loader())
    path = callback.save_last_checkpoint(trainer, module)
    assert path == tmp_path / "last-step=8" and callback.last_model_path == str(path)
    assert os.stat(path / "state.pt").st_ino == os.stat(tmp_path / "epoch=0-step=8/state.pt").st_ino
    assert callback.save_last_checkpoint(trainer, module) == path  # already there


def test_save_last_checkpoint_is_resumable_even_with_save_weights_only(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, save_last=True)
    trainer = make_trainer(tmp_path, callback, max_epochs=1)
    module = TinyModule()
    trainer.fit(module, loader())
    for name in ("epoch=0-step=8", "last-step=8"):
        assert read_checkpoint(tmp_path / name, weights=False).state["weights_only"] is True
    path = callback.save_last_checkpoint(trainer, module)
    state = read_checkpoint(path, weights=False).state
    assert state["weights_only"] is False and "optimizers" in state
    with pytest.raises(CheckpointError, match="save_weights_only=True"):
        make_trainer(tmp_path, max_epochs=2).fit(
            TinyModule(), loader(), ckpt_path=tmp_path / "epoch=0-step=8"
        )
    # ...but its weights load for evaluation.
    make_trainer(tmp_path).validate(TinyModule(), loader(16), ckpt_path=tmp_path / "epoch=0-step=8")


def test_sigterm_saves_last_through_the_callback(tmp_path: Path) -> None:
    class TermAtStep3(Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    callback = ModelCheckpoint(dirpath=tmp_path)
    trainer = Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        callbacks=[TermAtStep3(), callback],
    )
    with pytest.raises(SystemExit, match="last-step=3"):
        trainer.fit(TinyModule(), loader())
    assert names(tmp_path) == ["last-step=3"]


# --- atomicity -------------------------------------------------------------------------------
def test_the_old_checkpoint_goes_only_after_the_new_one_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    original = Trainer.save_checkpoint

    def spy(self: Trainer, path: Any, weights_only: bool = False) -> Path:
        seen.append(names(tmp_path))
        if len(seen) == 3:
            raise OSError("disk full")
        return original(self, path, weights_only)

    monkeypatch.setattr(Trainer, "save_checkpoint", spy)
    callback = ModelCheckpoint(dirpath=tmp_path)
    with pytest.raises(OSError, match="disk full"):
        make_trainer(tmp_path, callback, max_epochs=4).fit(TinyModule(), loader())
    assert seen == [[], ["epoch=0-step=8"], ["epoch=1-step=16"]]
    # The failed save left the last good checkpoint and the bookkeeping that names it.
    assert names(tmp_path) == ["epoch=1-step=16"]
    assert callback.best_model_path == str(tmp_path / "epoch=1-step=16")
    assert list(callback.best_k_models) == [callback.best_model_path]


def test_leftovers_are_never_loaded_and_removed_at_the_next_save(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    make_trainer(tmp_path, max_epochs=1).fit(TinyModule(), loader())
    assert names(folder) == ["epoch=0-step=8", "last-step=8"]
    # A complete-looking leftover of an interrupted save with a higher step.
    leftover = folder / ".tmp-last-step=99-12345"
    shutil.copytree(folder / "last-step=8", leftover)
    meta = json.loads((leftover / "meta.json").read_text())
    (leftover / "meta.json").write_text(json.dumps({**meta, "step": 99}))

    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(TinyModule(), loader(), ckpt_path="last")
    assert trainer.global_step == 16  # resumed from step 8, not the leftover's 99
    assert names(folder) == ["epoch=1-step=16", "last-step=16"]


# --- the default callback ------------------------------------------------------------------------
def test_the_default_callback_writes_last_under_default_root_dir(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    [callback] = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert trainer.checkpoint_callback is callback and callback.save_last is True
    trainer.fit(TinyModule(), loader())
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["epoch=1-step=16", "last-step=16"]
    assert callback.best_model_path == str(folder / "epoch=1-step=16")
    assert callback.last_model_path == str(folder / "last-step=16")


def test_enable_checkpointing_false(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, enable_checkpointing=False)
    assert trainer.checkpoint_callback is None
    trainer.fit(TinyModule(), loader())
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(MisconfigurationError, match="enable_checkpointing=False.*ModelCheckpoint"):
        make_trainer(tmp_path, ModelCheckpoint(), enable_checkpointing=False)


def test_a_given_callback_replaces_the_default(tmp_path: Path) -> None:
    callback = ModelCheckpoint(monitor="val_loss")
    trainer = make_trainer(tmp_path, callback)
    assert [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)] == [callback]


def test_a_fresh_fit_warns_about_another_runs_checkpoints(tmp_path: Path) -> None:
    make_trainer(tmp_path, max_epochs=1).fit(TinyModule(), loader())
    with pytest.warns(UserWarning, match="already holds 2 checkpoint.*another run"):
        make_trainer(tmp_path, max_epochs=1).fit(TinyModule(), loader())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path, max_epochs=3).fit(TinyModule(), loader(), ckpt_path="last")


# --- state and resume ----------------------------------------------------------------------------
def test_state_key_names_what_tells_two_apart() -> None:
    key = ModelCheckpoint(monitor="val_loss").state_key
    assert key == (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': None, "
        "'every_n_epochs': None}"
    )
    assert ModelCheckpoint(monitor="val_loss", mode="max").state_key != key


def test_top_k_bookkeeping_survives_a_resume(tmp_path: Path) -> None:
    scores = [4.0, 2.0, 3.0, 1.0]

    def callback() -> ModelCheckpoint:
        return ModelCheckpoint(monitor="score", save_top_k=2, save_last=True)

    first = callback()
    make_trainer(tmp_path, first, max_epochs=2).fit(ScoredModule(scores), loader(), loader(16))
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["epoch=0-step=8", "epoch=1-step=16", "last-step=16"]

    second = callback()
    trainer = make_trainer(tmp_path, second, max_epochs=4)
    trainer.fit(ScoredModule(scores), loader(), loader(16), ckpt_path="last")
    # Epoch 2 (3.0) beat epoch 0 (4.0), epoch 3 (1.0) beat epoch 2: the earlier ones were known.
    assert second.best_k_models == {
        str(folder / "epoch=1-step=16"): 2.0,
        str(folder / "epoch=3-step=32"): 1.0,
    }
    assert names(folder) == ["epoch=1-step=16", "epoch=3-step=32", "last-step=32"]
    assert second.best_model_path == str(folder / "epoch=3-step=32")
    assert second.kth_best_model_path == str(folder / "epoch=1-step=16")
    assert second.last_model_path == str(folder / "last-step=32")


def test_a_resume_into_another_folder_keeps_only_best_model_path(tmp_path: Path) -> None:
    first = ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=2, save_last=True)
    make_trainer(tmp_path, first).fit(TinyModule(), loader())
    second = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=2)
    with pytest.warns(UserWarning, match="only best_model_path is restored"):
        make_trainer(tmp_path, second, max_epochs=3).fit(
            TinyModule(), loader(), ckpt_path=first.last_model_path
        )
    assert names(tmp_path / "a") == ["epoch=0-step=8", "epoch=1-step=16", "last-step=16"]
    assert names(tmp_path / "b") == ["epoch=2-step=24"]


@pytest.mark.parametrize(
    "validate",
    [
        False,  # saved at on_train_epoch_end
        True,  # saved at on_validation_end
    ],
)
def test_its_checkpoints_resume_exactly(tmp_path: Path, validate: bool) -> None:
    def run(root: Path, epochs: int, ckpt_path: str | None = None) -> TinyModule:
        module = TinyModule(hidden=8)
        trainer = make_trainer(root, max_epochs=epochs, seed=7)
        data = loader(shuffle=True)
        trainer.fit(module, data, loader(16) if validate else None, ckpt_path=ckpt_path)
        return module

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4, ckpt_path="last")
    for (name, expected), actual in zip(
        whole.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name


# --- two processes -------------------------------------------------------------------------------
def two_process_scenario(out: Path) -> None:
    """Run under torchrun by the test below: the monitored value differs between the ranks
    (not synced), so only rank zero's decision keeps the collective saves in step."""

    class RankScored(TinyModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            scores = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]][self.trainer.global_rank]
            self.log("score", torch.tensor(scores[self.current_epoch]))

    folder = out / "checkpoints"
    callback = ModelCheckpoint(dirpath=folder, monitor="score", save_last=True)
    trainer = make_trainer(out, callback, max_epochs=3, accelerator="cpu")
    trainer.fit(RankScored(), loader(), loader(16))
    result = {
        "world_size": trainer.world_size,
        "best": callback.best_model_path,
        "kept": callback.best_k_models,
        "last": callback.last_model_path,
        "files": names(folder),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_processes_follow_rank_zeros_decision(tmp_path: Path) -> None:
    from tests.distributed.launching import run_two_processes

    run_two_processes(Path(__file__), str(tmp_path), timeout=120, EMBER_COLLECTIVE_TIMEOUT="60")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    folder = tmp_path / "checkpoints"
    # 64 samples over two ranks, batches of 8: 4 steps per epoch.
    expected = {
        "world_size": 2,
        "best": str(folder / "epoch=0-step=4"),
        "kept": {str(folder / "epoch=0-step=4"): 1.0},
        "last": str(folder / "last-step=12"),
        "files": ["epoch=0-step=4", "last-step=12"],
    }
    assert ranks[0] == expected
    assert {key: ranks[1][key] for key in ("best", "kept", "last")} == {
        key: expected[key] for key in ("best", "kept", "last")
    }


if __name__ == "__main__":
    two_process_scenario(Path(sys.argv[1]))
