"""The documentation: the API reference covers every public name, docstring examples run,
and the version is written in one place. (``make docs`` builds the site with
``mkdocs build --strict``; ``ember env`` printing the version is tested in test_cli.py.)"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import runpy
from pathlib import Path

import pytest

import ember
import ember.callbacks
import ember.loggers
import ember.profilers

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "docs" / "api"
PUBLIC_PACKAGES = (ember, ember.callbacks, ember.loggers, ember.profilers)


def public_names() -> list[str]:
    """Every public name, read from the packages' ``__all__`` now (not a copy of them)."""
    names = []
    for package in PUBLIC_PACKAGES:
        for name in package.__all__:
            if not name.startswith("__"):
                names.append(f"{package.__name__}.{name}")
    return names


def documented_names() -> dict[str, str]:
    """``::: dotted.name`` directive -> the API page holding it."""
    found = {}
    for page in sorted(API_DIR.glob("*.md")):
        for match in re.finditer(r"^:::\s*(\S+)\s*$", page.read_text(), re.MULTILINE):
            found[match.group(1)] = page.name
    return found


def resolve(dotted: str) -> object:
    module_name, _, attribute = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def test_every_public_name_is_in_the_api_reference() -> None:
    documented = documented_names()
    missing = [name for name in public_names() if name not in documented]
    assert not missing, (
        f"public names missing from docs/api/*.md: {missing}; add a `::: <name>` line to "
        "the page they belong on"
    )


def test_every_api_directive_names_a_public_object() -> None:
    public = {id(resolve(name)): name for name in public_names()}
    for directive, page in documented_names().items():
        target = resolve(directive)  # raises when the name does not exist
        if directive.startswith("ember.hooks."):
            continue  # the module-side events, documented beside TrainModule
        assert id(target) in public, f"{page}: `::: {directive}` is not a public name"


def has_example(obj: object) -> bool:
    """An ``Examples:`` section (Google style, plural): mkdocstrings shows its ``>>>`` lines
    as code. A singular ``Example:`` is only a note, whose ``>>>`` lines become quotes."""
    doc = getattr(obj, "__doc__", None) or ""
    return bool(re.search(r"^\s*Examples:\s*$", doc, re.MULTILINE))


def test_every_public_name_has_an_example() -> None:
    lacking = [name for name in public_names() if not has_example(resolve(name))]
    assert not lacking, (
        f"public names whose docstring has no `Examples:` section (Google style, plural): {lacking}"
    )


def test_the_api_reference_keeps_every_docstring_check() -> None:
    """``mkdocs build --strict`` fails on a docstring whose Args do not match the signature;
    no page may switch those checks off (one entry per argument instead)."""
    for page in sorted(API_DIR.glob("*.md")):
        text = page.read_text()
        for check in ("warn_unknown_params", "warn_missing_types", "docstring_options"):
            assert check not in text, f"{page.name} turns off a docstring check: {check}"


def ember_modules() -> list[str]:
    names = ["ember"]
    for info in pkgutil.walk_packages(ember.__path__, prefix="ember."):
        if info.name != "ember.__main__":
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", ember_modules())
def test_docstring_examples_run(
    module_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``>>>`` example in src/ember runs and prints what it shows (in a fresh folder,
    so examples that write logs or checkpoints leave nothing behind)."""
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        # Only the docstrings written in this module (not objects it imports).
        if test.filename and Path(test.filename).resolve() != Path(module.__file__).resolve():
            continue
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed in {module_name}"


def test_the_version_is_written_once_and_read_by_the_build() -> None:
    setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml")
    config = setuptools_config.read_configuration(ROOT / "pyproject.toml", expand=True)
    project = config["project"]
    assert "version" in project["dynamic"]
    assert project["version"] == ember.__version__
    # No second copy of the version string anywhere in the package or the build files.
    for path in [ROOT / "pyproject.toml", *(ROOT / "src" / "ember").rglob("*.py")]:
        text = path.read_text()
        copies = re.findall(r"""^\s*(?:__)?version(?:__)?\s*=\s*["']\d""", text, re.MULTILINE)
        if path.name == "__init__.py" and path.parent.name == "ember":
            assert len(copies) == 1, f"{path}: {copies}"
        else:
            assert not copies, f"{path} writes a version of its own: {copies}"


def test_the_changelog_has_a_section_for_the_current_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog
    assert re.search(rf"^## \[?{re.escape(ember.__version__)}\]?", changelog, re.MULTILINE)


def test_the_home_page_example_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/index.md includes this file; it must run and learn as the page says."""
    monkeypatch.chdir(tmp_path)
    script = ROOT / "docs" / "snippets" / "index_first_model.py"
    assert f'--8<-- "{script.name}"' in (ROOT / "docs" / "index.md").read_text()
    namespace = runpy.run_path(str(script), run_name="__main__")
    trainer = namespace["trainer"]
    assert trainer.global_step == 5 * 8  # 5 epochs of 256 / 32 batches
    assert trainer.callback_metrics["train_loss"] < 0.01  # y = x.sum() is learnable exactly
    assert (tmp_path / "checkpoints").is_dir()
