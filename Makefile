# Two commands from a fresh clone: `make run` (the default sweep) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint format lock docs docs-examples clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/towerspace sweep experiments/digits_continuum.yaml --restart

test: $(STAMP)  # two processes (pytest-xdist), the slow tests first (conftest.py)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal

test-fast: $(STAMP)  # the inner loop: unit tests, no Ray, no subprocesses
	$(BIN)/python -m pytest -m "not slow" -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: $(STAMP)  # the reference pages generated from the code, then the site in site/
	$(BIN)/python docs/gen_reference.py
	$(BIN)/mkdocs build --strict

docs-examples: $(STAMP)  # rerun the demo and the other recorded runs (about 25 min), then docs
	$(BIN)/python docs/gen_examples.py
	$(MAKE) docs

lock: $(STAMP)
	{ grep '^#' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable \
		| grep -v '^towerspace'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
