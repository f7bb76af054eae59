# Two commands do everything: `make up` runs fleetlog, `make test` proves it works.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
ARGS    ?=

FAULTS  := $(CURDIR)/.faults.jsonl

.PHONY: install install-test install-bench lock up test faults lint bench screenshots clean

LOCK    := deploy/requirements.lock
PIP_VERSION := 26.3

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'pip==$(PIP_VERSION)'

# One stamp per set of extras: `make up` installs only what running needs,
# `make test` and `make bench` add their own tools, all at the versions in $(LOCK)
# (so a fresh machine gets what CI saw).
$(VENV)/.installed-%: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) -e '.$(if $(filter run,$*),,[$*])'
	touch $@

# Refresh the lock on purpose: the newest versions pyproject.toml allows, every extra,
# in a scratch environment; review the diff, then `make lint test`.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q 'pip==$(PIP_VERSION)'
	.lock-venv/bin/pip install -q -e '.[test,bench]'
	{ sed -n '1,3p' $(LOCK); .lock-venv/bin/pip freeze --exclude-editable | grep -v '^fleetlog'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK); rm -rf .lock-venv

install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

up: install
	$(BIN)/fleetlog up $(ARGS)

# The whole suite, fault injection included; its table is printed at the end.
test: install-test
	@$(BIN)/python -m tests.prerequisites
	@rm -f $(FAULTS)
	FLEETLOG_FAULTS_REPORT=$(FAULTS) $(BIN)/python -m pytest -q $(ARGS); status=$$?; \
	$(BIN)/python -m tests.faults.report $(FAULTS); exit $$status

# Only the fault-injection suite, and its table: scenario, acked, stored, lost, duplicated.
faults: install-test
	@$(BIN)/python -m tests.prerequisites
	@rm -f $(FAULTS)
	FLEETLOG_FAULTS_REPORT=$(FAULTS) $(BIN)/python -m pytest -q tests/faults $(ARGS); status=$$?; \
	$(BIN)/python -m tests.faults.report $(FAULTS); exit $$status

# The console's screenshots in docs/screenshots, refreshed by its browser test.
screenshots: install-test
	FLEETLOG_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/python -m pytest -q tests/browser

lint: install-test
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy --strict src

bench: install-bench
	$(BIN)/python -m bench $(if $(QUICK),--quick,) $(ARGS)
	$(BIN)/python -m bench.pg_drain --quick  # PostgreSQL vs SQLite drain, reads (about 30 s)
	$(BIN)/python -m bench.ingest_reads --quick  # drain alone vs under 4 reading clients, WAL (about 40 s)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
