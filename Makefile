# Two commands set everything up: `make sweep` and `make test` both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sweep test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

sweep: install
	$(BIN)/harness sweep studies/lambda.yaml

test: install
	$(BIN)/pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check harness tests benchmarks scripts
	$(BIN)/ruff format --check harness tests benchmarks scripts
	$(BIN)/mypy harness scripts benchmarks

bench: install
	$(BIN)/harness bench --batch-size 64
	$(BIN)/harness bench --batch-size 128

clean:
	rm -rf $(VENV) mlruns/mlflow.db mlruns/optuna.db mlruns/artifacts
