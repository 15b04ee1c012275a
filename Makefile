# dbtvenv: `make test` installs everything it needs into .venv and runs lint plus the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CACHE ?= $(CURDIR)/.demo-cache
DEMO_REQUIREMENTS := --requirements 'dbt-core~=1.11.0' --requirements 'dbt-duckdb~=1.11.0'
PYTEST_ARGS ?=

.PHONY: dev lint format test test-fast test-airflow test-cosmos demo bench bench-cosmos completions clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade 'pip>=23'
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

dev: $(VENV)/.installed

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict dbtvenv

format: dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: dev
	$(BIN)/python -m pytest -m 'not e2e and not airflow and not cosmos' $(PYTEST_ARGS)

test-airflow: dev
	$(BIN)/python -m pytest -m airflow $(PYTEST_ARGS)

test-cosmos: dev
	$(BIN)/python -m pytest -m cosmos $(PYTEST_ARGS)

demo: dev
	cd examples/jaffle_duckdb && DBT_PROFILES_DIR=. \
		$(abspath $(BIN))/dbtvenv build $(DEMO_REQUIREMENTS) --venv-dir $(abspath $(DEMO_CACHE))

bench: dev
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/warm.py

bench-cosmos: dev
	$(BIN)/python benchmarks/cosmos.py

completions: dev
	for shell in bash zsh fish; do $(BIN)/dbtvenv completion $$shell > completions/dbtvenv.$$shell; done

clean:
	rm -rf $(VENV) $(DEMO_CACHE) .mypy_cache .ruff_cache .pytest_cache
