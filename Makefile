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

.PHONY: setup repro test test-fast postgres lint ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "make: no Python 3.11, 3.12 or 3.13 found; install one or pass PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

repro: setup
	$(RUN) dvc repro

# The PostgreSQL tests start their own server from the distribution's binaries; install them when missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || \
	{ echo "installing PostgreSQL server binaries for the tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends postgresql; }

# One test process per core (pytest-xdist). Most tests wait on chains of single-threaded subprocesses (dvc, stage
# scripts importing torch and MLflow), so two run side by side on two cores. --dist loadfile keeps a file's tests,
# and its module-scoped project and servers, on one worker.
PYTEST := python -m pytest -n auto --dist loadfile

test: setup postgres
	$(RUN) $(PYTEST)

test-fast: setup
	$(RUN) $(PYTEST) -m "not slow"

lint: setup
	$(RUN) ruff check src stages tests benchmarks

ui: setup
	$(RUN) python -m kennel ui

clean:
	rm -rf $(VENV)
