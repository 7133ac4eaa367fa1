# QLM on Triton. A fresh machine needs two commands: `make serve` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-dev
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test lint typecheck unit integration test-slow fmt clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/qlm-serve $(SERVE_ARGS)

lint: setup
	$(BIN)/ruff check qlm_backend tests clients loadtest model_repository
	$(BIN)/ruff format --check qlm_backend tests clients loadtest model_repository

typecheck: setup
	$(BIN)/mypy qlm_backend

unit: setup
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest tests/integration -q $(PYTEST_ARGS)

test: setup lint typecheck
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

fmt: setup
	$(BIN)/ruff format qlm_backend tests clients loadtest model_repository
	$(BIN)/ruff check --fix qlm_backend tests clients loadtest model_repository

clean:
	rm -rf $(VENV) .qlm .pytest_cache .mypy_cache .ruff_cache
