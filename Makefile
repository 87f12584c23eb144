# Two commands on a fresh machine: `make repro` (set up .venv, run the pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.kennel-installed
# Stage commands call `python` and `dvc`: make them the project's.
RUN := PATH="$(BIN):$$PATH"

.PHONY: setup repro test lint ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

repro: setup
	$(RUN) dvc repro

test: setup
	$(RUN) python -m pytest

lint: setup
	$(RUN) ruff check src stages tests benchmarks

ui: setup
	$(RUN) python -m kennel ui

clean:
	rm -rf $(VENV)
