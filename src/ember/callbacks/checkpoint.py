"""``ModelCheckpoint``: save checkpoints while fit runs; keep the best k and the last one.

Each save is one ``Trainer.save_checkpoint`` (atomic: a temporary sibling renamed into place)
under a name no directory has yet; what it replaces is deleted only afterwards. With several
processes, global rank zero decides what a save does (names, which checkpoints leave the top
k) and broadcasts the decision, because ``save_checkpoint`` is collective and every process
must make the same calls.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING, Any

from ember.checkpoint.files import (
    complete_checkpoints,
    delete_checkpoint,
    link_checkpoint,
    remove_leftovers,
)
from ember.errors import MisconfigurationError
from ember.hooks import Callback
from ember.trainer.checkpoint import LAST_PREFIX

if TYPE_CHECKING:
    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer

_MODES = ("min", "max")
DEFAULT_FILENAME = "{epoch}-{step}"
#: The names ``last`` is written under; only these are removed when a newer ``last`` lands.
_LAST_NAME = re.compile(rf"^{LAST_PREFIX}-step=\d+$")


@dataclass
class _Plan:
    """What one save does, decided on global rank zero and the same on every process."""

    error: str | None = None
    top_k_path: str | None = None  # the new top-k checkpoint to write, if any
    last_path: str | None = None  # the ``last`` checkpoint to write, if any
    bookkeeping: dict[str, Any] = field(default_factory=dict)  # state once the save is done
    remove: list[str] = field(default_factory=list)  # top-k checkpoints to delete afterwards


@dataclass
class _Written:
    """The newest checkpoint this process wrote (not saved: a ``last`` at the same step is
    made from it by hard links)."""

    step: int
    path: str
    weights_only: bool


class ModelCheckpoint(Callback):
    """Saves checkpoints during fit, keeps the best ``save_top_k`` of them by ``monitor``
    and, with ``save_last``, a ``last-step=<global_step>`` checkpoint to resume from.

    When it saves: with ``every_n_train_steps=n``, after each optimizer step whose
    ``global_step`` is a multiple of n; otherwise every ``every_n_epochs`` epochs (default 1),
    after each validation run of such an epoch when fit validates, else at the end of the
    training epoch. Never during the sanity check, never twice at one ``global_step``.

    Names come from ``filename`` (default ``"{epoch}-{step}"``): each ``{name}`` or
    ``{name:format}`` becomes ``name=value`` (``epoch=3-step=120``; ``{val/loss:.3f}`` gives
    ``val_loss=0.123``); a name that exists already gets ``-v1``, ``-v2``, ...

    Args:
        dirpath: the folder of the checkpoints (default: ``<default_root_dir>/checkpoints``,
            the same for every version of the logs, so a restarted process finds it).
        filename: the name template of the top-k checkpoints.
        monitor: the name in ``trainer.callback_metrics`` that ranks checkpoints; None keeps
            the latest ``save_top_k``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        save_top_k: how many to keep; -1 keeps every one, 0 none (only ``last``, if asked).
        save_last: also write ``last-step=<global_step>`` after each save (hard links to the
            top-k checkpoint of the same step; no second write).
        every_n_train_steps: save every n optimizer steps instead of by epochs.
        every_n_epochs: save every n epochs (default 1).
        save_weights_only: write only the weights, hparams and progress (not resumable).

    Attributes:
        best_model_path: the best checkpoint kept ("" before any).
        best_model_score: its monitored value (None before any, or without ``monitor``).
        best_k_models: path -> monitored value of each kept checkpoint (None without monitor).
        kth_best_model_path: the kept checkpoint the next better one replaces.
        last_model_path: the newest ``last`` checkpoint ("" before any).

    Examples:
        Keep the checkpoint with the lowest training loss, plus the latest to resume from:

        >>> import os
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> from ember.callbacks import ModelCheckpoint
        >>> class Regression(ember.TrainModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.layer = nn.Linear(3, 1)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        ...         self.log("train_loss", loss, on_step=False, on_epoch=True)
        ...         return loss
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> _ = ember.seed_everything(0)
        >>> x = torch.randn(32, 3)
        >>> loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
        >>> checkpoint = ModelCheckpoint(dirpath="checkpoints", monitor="train_loss",
        ...                              save_top_k=1, save_last=True)
        >>> trainer = ember.Trainer(max_epochs=2, callbacks=[checkpoint], logger=False,
        ...                         enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Regression(), loader)
        >>> sorted(os.listdir("checkpoints"))  # epoch=0-step=4 is no longer the best: deleted
        ['epoch=1-step=8', 'last-step=8']
        >>> os.path.basename(checkpoint.best_model_path)
        'epoch=1-step=8'

        Resume from the latest with ``trainer.fit(module, loader, ckpt_path="last")``, or
        load the best weights with ``Regression.load_from_checkpoint(checkpoint.best_model_path)``.
    """

    monitors = True
    writes_checkpoints = True

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_weights_only: bool = False,
    ) -> None:
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise MisconfigurationError(
                f"`ModelCheckpoint(dirpath={dirpath!r})` is not supported: give a folder path "
                "(str or pathlib.Path), or None for <default_root_dir>/checkpoints."
            )
        if filename is not None:
            _check_template(filename)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise MisconfigurationError(
                f"`ModelCheckpoint(monitor={monitor!r})` is not supported: give the name of a "
                "logged metric, e.g. 'val_loss', or None to keep the latest checkpoints."
            )
        if mode not in _MODES:
            raise MisconfigurationError(
                f"`ModelCheckpoint(mode={mode!r})` is not supported. Accepted values: 'min' "
                "(lower is better), 'max'."
            )
        if not _is_int(save_top_k) or save_top_k < -1:
            raise MisconfigurationError(
                f"`ModelCheckpoint(save_top_k={save_top_k!r})` is not supported: use an "
                "integer >= 0 (how many to keep), or -1 to keep every checkpoint."
            )
        if save_last not in (None, True, False):
            raise MisconfigurationError(
                f"`ModelCheckpoint(save_last={save_last!r})` is not supported: use True, False "
                "or None (no last checkpoint)."
            )
        for name, value in (
            ("every_n_train_steps", every_n_train_steps),
            ("every_n_epochs", every_n_epochs),
        ):
            if value is not None and (not _is_int(value) or value < 1):
                raise MisconfigurationError(
                    f"`ModelCheckpoint({name}={value!r})` is not supported: use an integer "
                    ">= 1, or None."
                )
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise MisconfigurationError(
                f"`ModelCheckpoint(every_n_train_steps={every_n_train_steps!r}, every_n_epochs="
                f"{every_n_epochs!r})`: give one of the two, not both."
            )
        if not isinstance(save_weights_only, bool):
            raise MisconfigurationError(
                f"`ModelCheckpoint(save_weights_only={save_weights_only!r})` is not "
                "supported: use True or False."
            )
        self.dirpath: Path | None = Path(dirpath).absolute() if dirpath is not None else None
        self.filename = filename
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.save_weights_only = save_weights_only
        self.best_k_models: dict[str, float | None] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.kth_best_model_path = ""
        self.last_model_path = ""
        #: The global step of the last save (None before any): one save per step value.
        self.last_saved_step: int | None = None
        self._after_validation = False
        self._newest: _Written | None = None

    # --- state ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Two ModelCheckpoints that rank or schedule differently keep separate states.
        identity = {
            "monitor": self.monitor,
            "mode": self.mode,
            "every_n_train_steps": self.every_n_train_steps,
            "every_n_epochs": self.every_n_epochs,
        }
        return f"{type(self).__qualname__}{identity!r}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "dirpath": str(self.dirpath) if self.dirpath is not None else None,
            "best_model_path": self.best_model_path,
            "best_model_score": self.best_model_score,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "last_model_path": self.last_model_path,
            "last_saved_step": self.last_saved_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if self.dirpath is not None and saved is not None and not _same(saved, self.dirpath):
            # The kept checkpoints are in another folder: ranking them against this folder's
            # would delete files this callback does not own.
            warnings.warn(
                f"ModelCheckpoint: the checkpoint was written with dirpath {saved!r}, this run "
                f"saves to {str(self.dirpath)!r}; only best_model_path is restored (the top-k "
                "and last bookkeeping starts afresh here).",
                UserWarning,
                stacklevel=2,
            )
            self.best_model_path = str(state_dict.get("best_model_path", ""))
            return
        self._set_bookkeeping(state_dict)

    def _set_bookkeeping(self, state: Mapping[str, Any]) -> None:
        score = state.get("best_model_score")
        self.best_model_path = str(state.get("best_model_path", ""))
        self.best_model_score = float(score) if score is not None else None
        self.best_k_models = {
            str(path): (float(value) if value is not None else None)
            for path, value in dict(state.get("best_k_models", {})).items()
        }
        self.kth_best_model_path = str(state.get("kth_best_model_path", ""))
        self.last_model_path = str(state.get("last_model_path", ""))
        step = state.get("last_saved_step")
        self.last_saved_step = int(step) if step is not None else None

    # --- events ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = (Path(trainer.default_root_dir) / "checkpoints").absolute()

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._newest = None
        if trainer.global_step == 0 and trainer.is_global_zero:
            self._warn_about_other_runs()

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._after_validation = trainer.enable_validation

    def idle_events(self) -> frozenset[str]:
        # Without every_n_train_steps there is nothing to do after a batch.
        own = type(self).on_train_batch_end is ModelCheckpoint.on_train_batch_end
        if self.every_n_train_steps is None and own:
            return frozenset({"on_train_batch_end"})
        return frozenset()

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.every_n_train_steps
        step = trainer.global_step
        if every is None or step == 0 or step % every or step == self.last_saved_step:
            return
        if trainer.state.accumulation_position == 0:  # a step boundary
            self._save(trainer)

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if (
            self._after_validation
            and not trainer.sanity_checking
            and trainer.state.stage == "fit"
            and self._epoch_due(trainer)
        ):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._after_validation and self._epoch_due(trainer):
            self._save(trainer)

    def _epoch_due(self, trainer: Trainer) -> bool:
        if self.every_n_train_steps is not None:
            return False
        every = self.every_n_epochs or 1
        return (trainer.current_epoch + 1) % every == 0 and (
            trainer.global_step != self.last_saved_step
        )

    # --- names -----------------------------------------------------------------------------------
    def format_checkpoint_name(self, metrics: Mapping[str, float | int]) -> str:
        """The name ``filename`` gives for ``metrics`` (which holds ``epoch`` and ``step``):
        each field becomes ``name=value``, a ``/`` in a name becomes ``_``."""
        parts: list[str] = []
        for literal, name, spec, _ in Formatter().parse(self.filename or DEFAULT_FILENAME):
            parts.append(literal)
            if name is None:
                continue
            if name not in metrics:
                raise MisconfigurationError(
                    f"ModelCheckpoint(filename={self.filename!r}) names {name!r}, which was not "
                    f"logged. Logged names: {sorted(metrics)}."
                )
            try:
                value = format(metrics[name], spec or "")
            except (ValueError, TypeError) as error:
                raise MisconfigurationError(
                    f"ModelCheckpoint(filename={self.filename!r}): cannot format {name}="
                    f"{metrics[name]!r} with {spec!r}: {error}"
                ) from error
            parts.append(f"{name.replace('/', '_')}={value}")
        return "".join(parts)

    def _free_path(self, name: str) -> Path:
        """``dirpath / name``, or with ``-v1``, ``-v2``, ... when that exists: every save
        gets a new directory, so the old one stays intact until the new one is complete."""
        assert self.dirpath is not None
        candidate, version = name, 0
        while (self.dirpath / candidate).exists():
            version += 1
            candidate = f"{name}-v{version}"
        return self.dirpath / candidate

    # --- deciding (global rank zero) -------------------------------------------------------------
    def _plan(self, trainer: Trainer, step: int) -> _Plan:
        assert self.dirpath is not None, "setup sets dirpath"
        metrics = trainer.callback_metrics
        score: float | None = None
        if self.monitor is not None:
            if self.monitor not in metrics:
                return _Plan(
                    error=f"ModelCheckpoint(monitor={self.monitor!r}) found no metric named "
                    f"{self.monitor!r}. Logged names: {sorted(metrics)}. Log it with "
                    f"self.log({self.monitor!r}, value) or monitor one of those names."
                )
            score = float(metrics[self.monitor])
            if math.isnan(score):  # never better than anything
                score = math.inf if self.mode == "min" else -math.inf
        kept = dict(self.best_k_models)
        plan = _Plan()
        if self._keeps(score, kept):
            values = {**metrics, "epoch": trainer.current_epoch, "step": step}
            try:
                plan.top_k_path = str(self._free_path(self.format_checkpoint_name(values)))
            except MisconfigurationError as error:
                return _Plan(error=str(error))
            kept[plan.top_k_path] = score
            if self.save_top_k != -1 and len(kept) > self.save_top_k:
                worst = self._worst(kept)
                del kept[worst]
                plan.remove.append(worst)
        if self.save_last:
            plan.last_path = str(self.dirpath / f"{LAST_PREFIX}-step={step}")
        best = self._best(kept)
        plan.bookkeeping = {
            "best_model_path": best,
            "best_model_score": kept[best] if best else None,
            "best_k_models": kept,
            "kth_best_model_path": self._worst(kept) if kept else "",
            "last_model_path": plan.last_path or self.last_model_path,
            "last_saved_step": step,
        }
        return plan

    def _keeps(self, score: float | None, kept: dict[str, float | None]) -> bool:
        """Whether a checkpoint with ``score`` joins the top k."""
        if self.save_top_k == 0:
            return False
        if self.save_top_k == -1 or len(kept) < self.save_top_k or score is None:
            return True  # without a monitor the newest always joins (the oldest leaves)
        worst = kept[self._worst(kept)]
        assert worst is not None
        return score < worst if self.mode == "min" else score > worst

    def _worst(self, kept: dict[str, float | None]) -> str:
        if self.monitor is None:
            return next(iter(kept))  # the oldest (kept in the order they were written)
        pick = max if self.mode == "min" else min
        return pick(kept, key=lambda path: _number(kept[path]))

    def _best(self, kept: dict[str, float | None]) -> str:
        if not kept:
            return ""
        if self.monitor is None:
            return next(reversed(kept))  # the newest
        pick = min if self.mode == "min" else max
        return pick(kept, key=lambda path: _number(kept[path]))

    # --- saving (every process) ------------------------------------------------------------------
    def _save(self, trainer: Trainer) -> None:
        step = trainer.global_step
        plan = self._plan(trainer, step) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            # save_checkpoint is collective: every process must take rank zero's decision
            # (monitored values need not be synced, and only rank zero sees the files).
            plan = trainer.accelerator.broadcast(plan, from_process=0)
        assert plan is not None
        if plan.error is not None:
            raise MisconfigurationError(plan.error)
        # The bookkeeping is updated first, so the checkpoint holds this save's own state.
        previous = self.state_dict()
        self._set_bookkeeping(plan.bookkeeping)
        try:
            if trainer.is_global_zero:
                remove_leftovers(self._folder())
            if plan.top_k_path is not None:
                trainer.save_checkpoint(plan.top_k_path, weights_only=self.save_weights_only)
                self._newest = _Written(step, plan.top_k_path, self.save_weights_only)
            if plan.last_path is not None:
                self._write_last(trainer, Path(plan.last_path), self.save_weights_only)
        except BaseException:
            self._set_bookkeeping(previous)
            raise
        if trainer.is_global_zero:  # only now that the new ones are in place
            for path in plan.remove:
                delete_checkpoint(Path(path))
            if plan.last_path is not None:
                self._remove_other_lasts(Path(plan.last_path))

    def save_last_checkpoint(self, trainer: Trainer, module: TrainModule) -> Path:
        """Write ``last-step=<global_step>`` now, whatever ``save_last`` says, and return its
        path (the Trainer calls this on SIGTERM / SIGINT; every process must call it). It is
        always a full, resumable checkpoint; when this step's checkpoint was just written,
        it is made of hard links to that one."""
        step = trainer.global_step
        path = self._folder() / f"{LAST_PREFIX}-step={step}"
        previous = self.state_dict()
        self.last_model_path, self.last_saved_step = str(path), step
        try:
            if trainer.is_global_zero:
                remove_leftovers(self._folder())
            self._write_last(trainer, path, weights_only=False)
        except BaseException:
            self._set_bookkeeping(previous)
            raise
        if trainer.is_global_zero:
            self._remove_other_lasts(path)
        return path

    def _write_last(self, trainer: Trainer, path: Path, weights_only: bool) -> None:
        newest = self._newest
        step = trainer.global_step
        if newest is not None and newest.step == step and (weights_only or not newest.weights_only):
            # The same step's checkpoint exists: link its files instead of writing again.
            if newest.path != str(path) and trainer.is_global_zero:
                link_checkpoint(Path(newest.path), path)
        else:
            trainer.save_checkpoint(path, weights_only=weights_only)
        self._newest = _Written(step, str(path), weights_only)

    def _remove_other_lasts(self, keep: Path) -> None:
        folder = self._folder()
        for entry in folder.iterdir() if folder.is_dir() else ():
            if _LAST_NAME.match(entry.name) and entry.name != keep.name:
                delete_checkpoint(entry)

    def _folder(self) -> Path:
        assert self.dirpath is not None, "setup sets dirpath"
        return self.dirpath

    def _warn_about_other_runs(self) -> None:
        known = {*self.best_k_models, self.last_model_path}
        others = [path for path in complete_checkpoints(self._folder()) if str(path) not in known]
        if others:
            warnings.warn(
                f"ModelCheckpoint: {str(self.dirpath)!r} already holds {len(others)} "
                f"checkpoint(s) of another run (e.g. {others[-1].name!r}), and this fit starts "
                "from scratch: its checkpoints go beside them, and ckpt_path='last' takes the "
                "newest 'last' there. Pass ckpt_path='last' to continue that run, or another "
                "dirpath / default_root_dir to keep the runs apart.",
                UserWarning,
                stacklevel=2,
            )


# --- helpers ---------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: float | None) -> float:
    return value if value is not None else math.nan


def _same(saved: str, folder: Path) -> bool:
    return Path(saved).resolve() == folder.resolve()


def _check_template(filename: Any) -> None:
    """A name template: ``{field}`` / ``{field:format}`` pieces and text without a folder
    separator, not starting with ``last`` or ``.`` (reserved for ``last`` and leftovers)."""
    problem = None
    if not isinstance(filename, str) or not filename:
        problem = "give a non-empty name template such as '{epoch}-{step}-{val_loss:.3f}'"
    else:
        try:
            pieces = list(Formatter().parse(filename))
        except ValueError as error:
            pieces, problem = [], f"it is not a valid template ({error})"
        separators = {"/", os.sep}
        if any(separator in literal for literal, *_ in pieces for separator in separators):
            problem = "it holds a folder separator; put folders in `dirpath`"
        elif any(name == "" for _, name, *_ in pieces):
            problem = "every {} must name a metric, e.g. {val_loss:.3f}"
        elif pieces and (pieces[0][0] or pieces[0][1] or "").startswith((LAST_PREFIX, ".")):
            problem = (
                f"names starting with {LAST_PREFIX!r} or '.' are reserved for the last "
                "checkpoint and for leftovers of interrupted saves"
            )
    if problem is not None:
        raise MisconfigurationError(
            f"`ModelCheckpoint(filename={filename!r})` is not supported: {problem}."
        )
