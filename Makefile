# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: demo test lint typecheck unit docs docs-serve venv bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp re-installs when pyproject.toml or the constraints change.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e ".[all,dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python examples/char_transformer.py

lint: venv
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -q

# The documentation site (mkdocs.yml): --strict fails on a broken link, a page missing from the
# nav, or a docstring mkdocstrings cannot read (no --quiet: it hides the warnings, and --strict
# then passes). Builds into site/ in a few seconds.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

test: lint typecheck docs unit

bench: venv
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache lightning_logs ember_logs
