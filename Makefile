# Two commands on a fresh machine: `make repro` (set up .venv, run the pipeline) and `make test`.
# The interpreter: the first of python3.11, python3.12, python3.13, python3 that is a 3.11-3.13; `make PYTHON=...`
# picks another.
SUPPORTED := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c '$(SUPPORTED)' 2>/dev/null && { command -v $$p; break; }; done)
endif
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.kennel-installed
# Stage commands call `python` and `dvc`: make them the project's.
RUN := PATH="$(BIN):$$PATH"
# Python caches each module's bytecode on first import (in .venv and next to src/). Where the environment turns
# that off (PYTHONDONTWRITEBYTECODE, common in containers), every stage process, dvc command and test would compile
# the ~1,300 modules torch and MLflow import from source again: ~5 s each, minutes over a pipeline or the tests.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup repro test test-fast coverage lint ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "make: no Python 3.11, 3.12 or 3.13 found; install one or pass PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	@# --no-compile: Python writes the bytecode of the modules actually imported on first use, not of every
	@# installed file up front (a minute of the install)
	$(BIN)/python -m pip install --quiet --no-compile -c requirements.lock -e '.[dev]'
	touch $(STAMP)

repro: setup
	$(RUN) dvc repro

# One test process per core (pytest-xdist). Most tests wait on chains of single-threaded subprocesses (dvc, stage
# scripts importing torch and MLflow), so two run side by side on two cores. --dist loadfile keeps a file's tests,
# and its module-scoped fixtures, on one worker; what every file shares (one pipeline run, one tracking server) is
# made once per invocation (tests/conftest.py). --durations: the slowest tests, to keep the suite within its budget.
PYTEST := python -m pytest -n auto --dist loadfile --durations=15

test: setup
	@start=$$(date +%s); $(RUN) $(PYTEST); status=$$?; \
	echo "make test: pytest took $$(( $$(date +%s) - start )) s"; exit $$status

test-fast: setup
	$(RUN) $(PYTEST) -m "not slow"

# Line coverage of src/ and stages/ (pyproject.toml's [tool.coverage]).
coverage: setup
	$(RUN) $(PYTEST) --cov --cov-report=term

lint: setup
	$(RUN) ruff check src stages tests benchmarks

ui: setup
	$(RUN) python -m kennel ui

clean:
	rm -rf $(VENV)
