# Two entry points for a fresh machine with Python 3.11 and git:
#   make run    create .venv if missing, install, run the whole DVC chain on the demo data
#               (members side by side in JOBS lanes, then a plain `dvc repro`), print the summary;
#               refuses to start when the planned probability maps exceed the free disk
#   make test   create .venv if missing, install, run the test suite
#   make plan   print the cost plan of params.yaml (runs, images, TTA passes, bytes, device-hours)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
JOBS ?= 2
PLAN_ARGS ?=
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run plan test test-all bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python pipeline/parallel.py --jobs $(JOBS)
	@cat reports/summary.md

# Runs nothing and prepares nothing: with data/manifest.csv (after `make run` or `dvc repro
# folds`) the plan counts the real frames; without it, the params-only numbers (runs, training
# images, checkpoints) and "unknown" for the rest, unless PLAN_ARGS gives the dataset's numbers,
# e.g. PLAN_ARGS="--frames 251633 --height 480 --width 853 --classes 124" (add --probe to time
# the models on this machine for device-hours, --json plan.json for a file)
plan: $(STAMP)
	$(BIN)/python pipeline/parallel.py --plan $(PLAN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest --runslow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/metrics.py

clean-venv:
	rm -rf $(VENV)
