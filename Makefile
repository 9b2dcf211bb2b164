# Two entry points for a fresh machine with Python 3.11 and git:
#   make run    create .venv if missing, install, run the whole DVC chain on the demo data
#               (members side by side in JOBS lanes, then a plain `dvc repro`), print the summary
#   make test   create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
JOBS ?= 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-all bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python pipeline/parallel.py --jobs $(JOBS)
	@cat reports/summary.md

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest --runslow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/metrics.py

clean-venv:
	rm -rf $(VENV)
