# Developer entry points. Everything runs from the virtual environment in $(VENV), which `make venv` creates
# and keeps in sync with pyproject.toml / package.json (a stamp file records the last install).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed.stamp

.PHONY: venv tools image-lock bench bench-smoke dev test lint protos clean-data

venv: $(STAMP)

$(STAMP): pyproject.toml package.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,load,bench]"
	npm install --no-audit --no-fund
	touch $@

# Deployment linters and validators used by tests/deploy/ (hadolint, kubernetes-validate, checkov, kubectl's
# kustomize), in their own environment: checkov pins many libraries that would fight the project's grpcio/protobuf.
# Every version is pinned in deploy/tools-requirements.txt.
TOOLS_VENV ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed.stamp

# promtool and prometheus (tests/deploy/test_monitoring.py, tests/e2e/test_alerts.py) come from Debian's
# `prometheus` package: installed here when missing and we are root (as on CI); otherwise it says what to run.
# apt would start it as a system service where systemd runs: the tests start their own, so that one is disabled.
tools: $(TOOLS_STAMP)
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
	  && { systemctl disable --now prometheus >/dev/null 2>&1 || true; }; \
	else \
	  echo "promtool/prometheus not found: run 'sudo apt-get install --no-install-recommends prometheus'" \
	    "(Debian/Ubuntu), or put Prometheus 2.x's promtool and prometheus on PATH, then 'make tools' again" >&2; \
	  exit 1; \
	fi

$(TOOLS_STAMP): deploy/tools-requirements.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --requirement deploy/tools-requirements.txt
	touch $@

# Re-pin deploy/image-requirements.txt (the container image's runtime dependencies) from the project's .venv.
image-lock: venv
	$(BIN)/python deploy/lock_image_requirements.py

dev: venv
	$(BIN)/python -m cqrsctl.dev

test: venv tools
	$(BIN)/python -m pytest -q --durations=15

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy examples/checkout_service.py deploy/lock_image_requirements.py deploy/monitoring/generate.py
	node_modules/.bin/buf lint

protos: venv
	PYTHON=$(BIN)/python scripts/gen_protos.sh

# The benchmark suite: starts the local stack, prints one table of figures beside same-run baselines.
bench: venv
	$(BIN)/python -m bench

bench-smoke: venv
	$(BIN)/python -m bench --quick

clean-data:
	rm -rf .data
