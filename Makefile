# One command surface. Every target creates .venv and installs the project first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint bench soak protos clean help

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

demo: $(STAMP)  ## run the three-force demo tour
	$(VENV)/bin/psngw demo

test: $(STAMP)  ## run the test suite (unit, integration, short soak)
	$(PY) -m pytest -m "not slow and not bench" -q

lint: $(STAMP)  ## ruff and mypy (strict) on gateway/
	$(VENV)/bin/ruff check gateway tests protos certs
	$(VENV)/bin/ruff format --check gateway
	$(VENV)/bin/mypy

bench: $(STAMP)  ## the benchmarks; JSON in bench-*.json
	$(VENV)/bin/psngw bench --json bench-gateway.json
	$(PY) -m pytest -m bench -q

soak: $(STAMP)  ## long soak and crash tests
	$(PY) -m pytest -m slow -q

protos: $(STAMP)  ## regenerate gateway/_proto from protos/
	$(PY) protos/generate.py

clean:  ## remove .venv and caches
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
