"""The config file written by ``ember config`` and read by ``Accelerator``.

It lives at ``$EMBER_CONFIG_FILE`` or ``~/.config/ember/default_config.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ember.errors import MisconfigurationError


def config_path() -> Path:
    """Where the config file is (whether or not it exists)."""
    explicit = os.environ.get("EMBER_CONFIG_FILE")
    if explicit:
        return Path(explicit).expanduser()
    return Path.home() / ".config" / "ember" / "default_config.yaml"


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The config file's settings; an empty dict when there is no file."""
    path = Path(path) if path is not None else config_path()
    if not path.is_file():
        return {}
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MisconfigurationError(
            f"The ember config file {path} is not valid YAML ({error}). "
            "Fix it or write a new one with `ember config --default`."
        ) from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise MisconfigurationError(
            f"The ember config file {path} must hold a mapping of settings, "
            f"got {type(content).__name__}. Write a new one with `ember config --default`."
        )
    return content


def save_config(settings: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write ``settings`` to the config file and return its path."""
    path = Path(path) if path is not None else config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=True))
    return path
