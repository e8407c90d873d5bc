# Two commands do all set-up on a fresh machine with only Python 3.11+:
#   make demo   run the daemon end to end against the shipped emulator
#   make test   create .venv, install everything, lint, type-check and run the suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck pytest soak bench demo emulator install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check batchd tests
	$(BIN)/ruff format --check batchd tests

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q -m 'not soak'

soak: $(STAMP)
	$(BIN)/pytest -q -m soak --timeout=3600

# Benchmarks of issue 8 (about 8 minutes): prints a table, writes tests/bench/results.json.
# BENCH_ARGS="--quick" for a smoke run, BENCH_ARGS="--only caps,scale" for some of them.
bench: $(STAMP)
	$(BIN)/python -m tests.bench.run --out tests/bench/results.json $(BENCH_ARGS)

demo: $(STAMP)
	$(BIN)/batchd demo --root demo

emulator: $(STAMP)
	$(BIN)/batchd emulator --host 127.0.0.1 --port 8765 --api-key sk-emulator

# Install as a systemd service (as root): venv in /opt/batchd, units, /etc/batchd, sysusers,
# tmpfiles. Stage without touching the system: make install DESTDIR=/tmp/stage NO_VENV=1
# [INSTANCES="cn intl"]
install:
	DESTDIR="$(DESTDIR)" PYTHON="$(PYTHON)" sh systemd/install.sh $(if $(NO_VENV),--no-venv) $(foreach i,$(INSTANCES),--instance $(i))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
