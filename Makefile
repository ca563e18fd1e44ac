# One command each: `make serve` runs the server, `make test` runs every test,
# `make demo` builds the demo page and serves it.
# Both set up what they need first (a venv in .venv, and node/node_modules for tests).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup serve demo test lint

$(BIN)/canvas-store-trio: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

node/node_modules/.package-lock.json: node/package-lock.json
	cd node && npm ci --no-audit --no-fund

setup: $(BIN)/canvas-store-trio node/node_modules/.package-lock.json

serve: $(BIN)/canvas-store-trio
	$(BIN)/canvas-store-trio serve

demo: setup
	node demo/build.mjs
	$(BIN)/canvas-store-trio serve --demo

test: setup
	$(BIN)/python -m pytest

lint: $(BIN)/canvas-store-trio
	$(BIN)/ruff check src tests
	$(BIN)/mypy
