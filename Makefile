# One command each: `make serve` runs the server, `make test` runs every test,
# `make demo` builds the demo page and serves it, `make docs` builds the docs site.
# Each sets up what it needs first: serve installs the runtime dependencies only into
# .venv; test and lint add the dev extras (and node/node_modules for the Node tests).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup serve demo test lint docs

$(BIN)/canvas-store-trio: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(BIN)/canvas-store-trio
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

node/node_modules/.package-lock.json: node/package-lock.json
	cd node && npm ci --no-audit --no-fund

setup: $(VENV)/.dev-installed node/node_modules/.package-lock.json

serve: $(BIN)/canvas-store-trio
	$(BIN)/canvas-store-trio serve

demo: setup
	node demo/build.mjs
	$(BIN)/canvas-store-trio serve --demo

test: setup
	$(BIN)/python -m pytest

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# The docs site (mkdocs.yml), into site/; --strict makes every warning an error.
docs: $(VENV)/.dev-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
