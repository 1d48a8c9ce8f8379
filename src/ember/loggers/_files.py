"""What the file-writing loggers share: version folders, YAML-safe hyperparameters, extras.

Kept private so that ``CSVLogger`` and ``TensorBoardLogger`` resolve ``version_N`` the same
way and write the same ``hparams.yaml``, and so that every optional logger names its
``pip install`` the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib.util
import os
import re
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import yaml

from ember.errors import MisconfigurationError
from ember.loggers.base import Logger

HPARAMS_FILE = "hparams.yaml"
_VERSION_FOLDER = re.compile(r"version_(\d+)")


class VersionedFolder:
    """``save_dir/name/version_N``, with ``N`` picked on first use and fixed after.

    Creating one touches nothing on disk. The first read of ``version`` or ``path`` picks the
    folder and creates it: claiming it at once is what stops a second logger in the same
    ``save_dir`` (in this process or another) from picking the same ``version_N``.

    Args:
        save_dir: the folder holding all experiments.
        name: the experiment's folder inside ``save_dir`` ("" puts versions in ``save_dir``).
        version: ``None`` for the next free ``version_N``; an int ``N`` for ``version_N``; a
            str used as the folder name as is. An existing folder is reused.
    """

    def __init__(self, save_dir: str | os.PathLike[str], name: str, version: int | str | None):
        if not isinstance(name, str):
            raise MisconfigurationError(
                f"`name={name!r}` is a {type(name).__name__}; the experiment name must be a "
                'str (the folder inside save_dir), e.g. name="ember", or "" for none.'
            )
        check_version(version)
        self.root = Path(save_dir) / name
        self.name = name
        self._requested = version
        self._folder: str | None = None
        # Whether the user chose the version: a chosen one is never replaced by adopt().
        self.explicit = version is not None

    @property
    def picked(self) -> bool:
        """Whether the folder is picked already (``version`` or ``path`` was read)."""
        return self._folder is not None

    @property
    def version(self) -> int | str:
        """The int ``N`` of ``version_N``, or the str folder name that was given."""
        folder = self.folder
        if isinstance(self._requested, str):
            return self._requested
        return int(folder.removeprefix("version_"))

    @property
    def folder(self) -> str:
        """The version folder's name, resolved (and created) on first read."""
        if self._folder is None:
            self._folder = self._claim()
        return self._folder

    @property
    def path(self) -> Path:
        """``save_dir/name/<version folder>``; it exists once this has been read."""
        return self.root / self.folder

    def follow(self, folder: str) -> None:
        """Name ``folder`` (picked by global rank zero) without creating or claiming it."""
        self._folder = folder

    def adopt(self, version: int | str) -> bool:
        """Use ``version`` (a saved run's) instead of the next free one; return whether it is.

        Refused (False) when the user gave a version, and when the folder already picked
        holds something: then this logger has written there, and moving would split what it
        wrote. A picked folder that is still empty (only ``version`` or ``log_dir`` was
        read) is removed and replaced.
        """
        check_version(version)
        if self.explicit:
            return False
        if self._folder is not None:
            if self._folder == _folder_name(version):
                return True
            claimed = self.root / self._folder
            if claimed.is_dir():
                if any(claimed.iterdir()):
                    return False
                # Empty, and ours: _claim created it with an atomic mkdir.
                claimed.rmdir()
            self._folder = None
        self._requested = version
        return True

    def _claim(self) -> str:
        if self._requested is not None:
            folder = _folder_name(self._requested)
            (self.root / folder).mkdir(parents=True, exist_ok=True)
            return folder
        self.root.mkdir(parents=True, exist_ok=True)
        number = next_free_version(self.root)
        while True:
            folder = f"version_{number}"
            try:
                # mkdir without exist_ok is atomic: whoever creates the folder owns it.
                (self.root / folder).mkdir()
            except FileExistsError:
                number += 1
                continue
            return folder


def check_version(version: Any) -> None:
    """Raise ``MisconfigurationError`` unless ``version`` is None, an int >= 0 or a folder name."""
    if isinstance(version, bool) or not isinstance(version, int | str | type(None)):
        raise MisconfigurationError(
            f"`version={version!r}` is a {type(version).__name__}; accepted: None (the "
            "next free version_N), an int N (version_N) or a str (the folder name)."
        )
    if isinstance(version, int) and version < 0:
        raise MisconfigurationError(
            f"`version={version}` is negative; pass an int >= 0, a str, or None for the "
            "next free version."
        )
    if isinstance(version, str) and (version in ("", ".", "..") or "/" in version):
        raise MisconfigurationError(
            f"`version={version!r}` is not a single folder name; pass a name without "
            '"/" such as "baseline", an int, or None for the next free version.'
        )


def _folder_name(version: int | str) -> str:
    """The folder of a given version: ``version_N`` for an int, the str itself otherwise."""
    return f"version_{version}" if isinstance(version, int) else version


def next_free_version(root: Path) -> int:
    """One more than the highest ``version_N`` folder in ``root`` (0 when there is none)."""
    if not root.is_dir():
        return 0
    numbers = [
        int(match.group(1))
        for entry in root.iterdir()
        if entry.is_dir() and (match := _VERSION_FOLDER.fullmatch(entry.name))
    ]
    return max(numbers, default=-1) + 1


def sanitize(value: Any) -> Any:
    """``value`` made of plain dicts, lists, str, int, float, bool and None only.

    Numbers, strings and None stay as they are; one-element tensors and numpy scalars become
    Python numbers; mappings, dataclasses and namespaces (``argparse``, ``types``) become
    dicts with str keys; lists, tuples and sets become lists; enums become their value;
    paths become str; classes and functions become their dotted name; anything else becomes
    its ``repr``.
    """
    return _sanitize(value, set())


def _sanitize(value: Any, seen: set[int]) -> Any:
    # Exact type checks: subclasses of str or dict (e.g. HyperParameters) make yaml.safe_dump
    # fail, so they are rebuilt as the plain type below.
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, enum.Enum):
        return _sanitize(value.value, seen)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)  # numpy.float64 subclasses float
    if isinstance(value, str):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, type | types.FunctionType | types.BuiltinFunctionType):
        return f"{value.__module__}.{value.__qualname__}"
    item = getattr(value, "item", None)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    if callable(item) and _single_element(value, numel):
        return _sanitize(item(), seen)
    if id(value) in seen:
        # A container that holds itself: stop rather than recurse forever.
        return repr(value)
    if isinstance(value, Mapping) or _is_namespace(value) or _is_dataclass_instance(value):
        seen = seen | {id(value)}
        items = _items(value)
        return {str(key): _sanitize(inner, seen) for key, inner in items}
    if isinstance(value, list | tuple | set | frozenset):
        seen = seen | {id(value)}
        ordered = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_sanitize(inner, seen) for inner in ordered]
    return repr(value)


def _single_element(value: Any, numel: Any) -> bool:
    """Whether a tensor- or array-like ``value`` holds exactly one number."""
    try:
        count = numel() if callable(numel) else numel
        return int(count) == 1
    except (TypeError, ValueError):
        return False


def _is_namespace(value: Any) -> bool:
    return isinstance(value, argparse.Namespace | types.SimpleNamespace)


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _items(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    if _is_dataclass_instance(value):
        # Not dataclasses.asdict: it deep-copies every field, tensors and modules included.
        return [(field.name, getattr(value, field.name)) for field in dataclasses.fields(value)]
    return list(vars(value).items())


def write_hparams_yaml(folder: Path, params: Mapping[str, Any]) -> Path:
    """Write ``params`` (sanitized) to ``folder/hparams.yaml`` atomically; return the path."""
    text = yaml.safe_dump(sanitize(dict(params)), sort_keys=False, allow_unicode=True)
    path = folder / HPARAMS_FILE
    with open_atomically(path) as file:
        file.write(text)
    return path


@contextmanager
def open_atomically(path: Path) -> Iterator[TextIO]:
    """A text file that replaces ``path`` on success, so no reader sees a half-written file.

    The file gets the mode a plain ``open`` would give it (``0o666`` less the umask, e.g.
    ``0o644``), not ``mkstemp``'s ``0o600``. On an error the old ``path`` is left untouched
    and the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(handle, 0o666 & ~_umask())
        # newline="" because the csv module writes its own line endings.
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def missing_extra_message(package: str, extra: str, logger: str) -> str:
    """The message raised when the optional ``package`` behind ``logger`` is not installed."""
    return (
        f"{logger} needs the `{package}` package, which is not installed. Install it with "
        f'`pip install "ember[{extra}]"` (or `pip install {package}`), or use '
        "ember.loggers.CSVLogger, which needs nothing extra."
    )


def is_installed(package: str) -> bool:
    """Whether ``package`` can be imported, found without importing it."""
    if package in sys.modules:
        # None there means "blocked": it is how tests (and some tools) hide a package.
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def require(package: str, extra: str, logger: str) -> None:
    """Raise ``ModuleNotFoundError`` naming the ``pip install`` when ``package`` is missing."""
    if not is_installed(package):
        raise ModuleNotFoundError(missing_extra_message(package, extra, logger), name=package)


class FolderLogger(Logger):
    """A logger writing into ``save_dir/name/version_N``: what it shares, resuming included."""

    _folder: VersionedFolder

    @property
    def name(self) -> str:
        """The experiment's folder name inside ``save_dir``."""
        return self._folder.name

    @property
    def version(self) -> int | str:
        """``N`` of ``version_N`` (picked on first read), or the str version that was given."""
        return self._folder.version

    @property
    def log_dir(self) -> str:
        """The version folder, ``save_dir/name/version_N``; created on first read."""
        return str(self._folder.path)

    def shared_run(self) -> dict[str, Any]:
        """``{"folder": "version_N"}``: the folder, picked (and created) now if it was not."""
        return {"folder": self._folder.folder}

    def follow_run(self, shared: dict[str, Any]) -> None:
        """Name rank zero's folder from ``log_dir`` / ``version``; nothing is created."""
        if "folder" in shared:
            self._folder.follow(str(shared["folder"]))

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"version": N}`` (or the str folder name); reading it picks the folder if unpicked.

        Picking it here, rather than leaving it to the first write, is what lets a checkpoint
        written before the first flush name the folder the run will write to.
        """
        return {"version": self._folder.version}

    def _continue_version(self, state: Mapping[str, Any]) -> None:
        """Adopt the saved version in ``state`` unless the user gave one (see ``adopt``).

        Warns when the logger already wrote to a folder of its own, which it then keeps.
        """
        saved = state.get("version")
        if saved is None or self._folder.explicit or self._folder.adopt(saved):
            return
        warnings.warn(
            f"{type(self).__name__} already wrote to {self._folder.path} before the fit "
            f"resumed, so it keeps writing there instead of continuing version {saved!r} of "
            "the checkpoint. Let the Trainer resume before anything is logged, or pass "
            f"`version={saved!r}` to continue that run.",
            UserWarning,
            stacklevel=3,
        )
