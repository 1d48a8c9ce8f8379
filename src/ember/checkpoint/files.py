"""Writing and reading a checkpoint directory.

A checkpoint is a directory holding ``model.safetensors`` (the full weights, readable with
plain safetensors), ``state.pt`` (everything else, read with ``weights_only=True``) and
``meta.json`` (what a person or a script needs without loading anything). It is written as a
temporary sibling (``.tmp-<name>-<pid>``), every file and the directory fsynced, then renamed
into place: a crash at any moment leaves either the complete checkpoint or none under its
name. Leftovers of an interrupted save start with ``.tmp-``; ``remove_leftovers`` deletes them
and nothing ever loads them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ember.checkpoint.plain import check_plain
from ember.errors import CheckpointError
from ember.serialization import save_safetensors

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
FILES = (MODEL_FILE, STATE_FILE, META_FILE)
TEMPORARY_PREFIX = ".tmp-"
#: An existing checkpoint moved aside while a new one takes its name (``_move_into_place``).
_OLD_NAME = re.compile(r"\.tmp-old-(.+)-\d+")
#: Test-only: ``<marker>`` or ``<marker>@N``: the first (or N-th) save of this process stops
#: after writing the weights (the middle of a save), creates the file ``<marker>`` and waits
#: there, so a test can kill the process at a known moment.
PAUSE_VARIABLE = "EMBER_TEST_PAUSE_IN_SAVE"
_saves_in_this_process = 0


@dataclass
class Checkpoint:
    """A checkpoint directory as read: ``weights`` (None when not loaded), ``state``
    (``state.pt``) and ``meta`` (``meta.json``)."""

    path: Path
    weights: dict[str, Tensor] | None
    state: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def write_checkpoint(
    path: str | os.PathLike[str],
    weights: dict[str, Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; return its path.

    ``state`` is checked first (``CheckpointError`` naming the offending key, before anything
    is written). An existing ``path`` is replaced: the new directory is complete before the
    old one is moved away.
    """
    check_plain(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        save_safetensors(weights, temporary / MODEL_FILE, atomic=False)
        _pause_if_asked()
        # The weights reach the disk while state.pt is written (fsync waits on the device,
        # not the CPU): measured about a fifth off a save of weights and Adam state.
        flushing = threading.Thread(target=_fsync_file, args=(temporary / MODEL_FILE,))
        flushing.start()
        try:
            torch.save(state, temporary / STATE_FILE)
            (temporary / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        finally:
            flushing.join()
        for name in (STATE_FILE, META_FILE):
            _fsync_file(temporary / name)
        _fsync_file(temporary)
        _move_into_place(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


def _move_into_place(temporary: Path, path: Path) -> None:
    """Rename the complete directory ``temporary`` to ``path``. An existing ``path`` is
    moved away under a leftover name first and deleted after."""
    if path.exists():
        old = path.with_name(f"{TEMPORARY_PREFIX}old-{path.name}-{os.getpid()}")
        os.replace(path, old)
        os.replace(temporary, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, path)
    _fsync_file(path.parent)


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a complete checkpoint with the files of ``source`` without writing
    them again: hard links in a temporary sibling (copies where links fail: another file
    system, no link support), then one rename, as ``write_checkpoint`` does."""
    temporary = target.with_name(f"{TEMPORARY_PREFIX}{target.name}-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        for entry in sorted(source.iterdir()):
            try:
                os.link(entry, temporary / entry.name)
            except OSError:
                shutil.copy2(entry, temporary / entry.name)
                _fsync_file(temporary / entry.name)
        _fsync_file(temporary)
        _move_into_place(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def delete_checkpoint(path: Path) -> None:
    """Remove a checkpoint directory: first renamed to a leftover name (one atomic step, so a
    crash never leaves half a checkpoint under a real name), then deleted."""
    if not path.exists():
        return
    doomed = path.with_name(f"{TEMPORARY_PREFIX}removed-{path.name}-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike[str], *, weights: bool = True) -> Checkpoint:
    """Read and check a checkpoint directory: ``CheckpointError`` naming the path and the
    problem when it is missing, incomplete, truncated or corrupt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the path does not exist.")
    if path.name.startswith(TEMPORARY_PREFIX):
        raise CheckpointError(
            f"{str(path)!r} is the leftover of an interrupted save (its name starts with "
            f"{TEMPORARY_PREFIX!r}); it is never loaded. Use a complete checkpoint beside it."
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{str(path)!r} is a file, not an ember checkpoint: a checkpoint is a directory "
            f"holding {', '.join(FILES)}."
        )
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} is not a complete ember checkpoint: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (a checkpoint holds "
            f"{', '.join(FILES)})."
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{str(path / META_FILE)!r} is corrupt: {error}") from error
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{str(path / STATE_FILE)!r} is truncated or corrupt, or holds objects a "
            f"weights_only load refuses: {type(error).__name__}: {str(error)[:300]}"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path / STATE_FILE)!r} does not hold a dict of state.")
    loaded = read_weights(path) if weights else None
    return Checkpoint(path, loaded, state, meta if isinstance(meta, dict) else {})


def read_weights(path: Path) -> dict[str, Tensor]:
    """``model.safetensors`` of the checkpoint at ``path`` (checked)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path / MODEL_FILE))
    except Exception as error:
        raise CheckpointError(
            f"{str(path / MODEL_FILE)!r} is truncated or corrupt: {type(error).__name__}: "
            f"{str(error)[:300]}"
        ) from error


def check_keys(path: Path, expected: list[str], found: list[str], what: str) -> None:
    """``CheckpointError`` listing missing and unexpected keys when ``found`` differs from
    ``expected`` (the weights of a different module)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"The checkpoint {str(path)!r} does not fit {what}: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}. Was it written for another model?"
        )


def check_weights(
    path: Path, module: torch.nn.Module, weights: dict[str, Tensor], what: str
) -> None:
    """``CheckpointError`` when ``weights`` do not fit ``module`` (``what`` names it): the
    missing and unexpected keys, or the keys whose shapes differ. Nothing is loaded."""
    expected = module.state_dict()
    check_keys(path, list(expected), list(weights), what)
    wrong = [
        f"{name}: {tuple(weights[name].shape)} here {tuple(value.shape)}"
        for name, value in expected.items()
        if isinstance(value, Tensor) and tuple(weights[name].shape) != tuple(value.shape)
    ]
    if wrong:
        more = f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise CheckpointError(
            f"The checkpoint {str(path)!r} does not fit {what}: weights of other shapes "
            f"({'; '.join(wrong[:5])}{more})."
        )


def _few(keys: list[str]) -> str:
    shown = keys[:8]
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    return f"{shown}{more}"


def complete_checkpoints(folder: str | os.PathLike[str], prefix: str = "") -> list[Path]:
    """The complete checkpoint directories in ``folder`` whose names start with ``prefix``
    (never a ``.tmp-`` leftover), oldest step first (``meta.json``'s step, then name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith(TEMPORARY_PREFIX) or not entry.name.startswith(prefix):
            continue
        if entry.is_dir() and all((entry / name).is_file() for name in FILES):
            found.append((_step_of(entry), entry.name, entry))
    return [entry for _, _, entry in sorted(found)]


def _step_of(path: Path) -> int:
    try:
        return int(json.loads((path / META_FILE).read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def remove_leftovers(folder: str | os.PathLike[str]) -> None:
    """Delete the ``.tmp-`` leftovers of interrupted saves in ``folder`` (not this process's
    save in progress: each save's temporary name carries its process id)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        old = _OLD_NAME.fullmatch(entry.name)
        if old is not None and not (folder / old.group(1)).exists() and entry.is_dir():
            # A save that replaced this checkpoint stopped between its two renames: the old
            # one is the only copy; it goes back under its name.
            os.replace(entry, folder / old.group(1))
            continue
        if entry.name.startswith(TEMPORARY_PREFIX) and not entry.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(
                missing_ok=True
            )


def _fsync_file(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _pause_if_asked() -> None:
    global _saves_in_this_process
    _saves_in_this_process += 1
    value = os.environ.get(PAUSE_VARIABLE)
    if not value:
        return
    marker, _, count = value.partition("@")
    if _saves_in_this_process != (int(count) if count else 1):
        return
    Path(marker).write_text(str(os.getpid()))
    while True:  # the test kills this process here
        time.sleep(0.05)
