# Developer entry points. Everything runs from the virtual environment in $(VENV), which `make venv` creates
# and keeps in sync with pyproject.toml / package.json (a stamp file records the last install).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed.stamp

.PHONY: venv dev test lint protos clean-data

venv: $(STAMP)

$(STAMP): pyproject.toml package.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	npm install --no-audit --no-fund
	touch $@

dev: venv
	$(BIN)/python -m cqrsctl.dev

test: venv
	$(BIN)/python -m pytest -q --durations=15

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	node_modules/.bin/buf lint

protos: venv
	PYTHON=$(BIN)/python scripts/gen_protos.sh

clean-data:
	rm -rf .data
