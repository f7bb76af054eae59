# Two commands do everything: `make up` runs fleetlog, `make test` proves it works.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

FAULTS  := $(CURDIR)/.faults.jsonl

.PHONY: install up test faults lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/fleetlog up $(ARGS)

# The whole suite, fault injection included; its table is printed at the end.
test: install
	@rm -f $(FAULTS)
	FLEETLOG_FAULTS_REPORT=$(FAULTS) $(BIN)/python -m pytest -q $(ARGS); status=$$?; \
	$(BIN)/python -m tests.faults.report $(FAULTS); exit $$status

# Only the fault-injection suite, and its table: scenario, acked, stored, lost, duplicated.
faults: install
	@rm -f $(FAULTS)
	FLEETLOG_FAULTS_REPORT=$(FAULTS) $(BIN)/python -m pytest -q tests/faults $(ARGS); status=$$?; \
	$(BIN)/python -m tests.faults.report $(FAULTS); exit $$status

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy --strict src

bench: install
	$(BIN)/python -m bench $(if $(QUICK),--quick,) $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
