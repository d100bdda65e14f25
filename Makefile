# Everything installs into .venv and deploy/kafka/target; nothing is needed by hand beyond
# Python 3.11+, Java 17 and Maven.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
KAFKA_JARS := deploy/kafka/target/libs/.complete
PYTEST_ARGS ?=

.PHONY: setup demo test lint typecheck unit bench bench-quick clean kafka-start kafka-stop

setup: $(STAMP) $(KAFKA_JARS)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(KAFKA_JARS): deploy/kafka/pom.xml
	deploy/kafka/kafka.sh fetch

demo: setup
	$(BIN)/cancel-worker demo

lint: $(STAMP)
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not integration and not e2e" $(PYTEST_ARGS)

test: setup lint typecheck
	$(BIN)/pytest --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

# Starts its own broker and simulator; results in .bench/results.json. BENCH_ARGS passes
# options through, e.g. BENCH_ARGS="--systems worker,pipeline_floor --scenarios 0ms".
BENCH_ARGS ?=

bench: setup
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

bench-quick: setup
	$(BIN)/python -m tests.bench --quick $(BENCH_ARGS)

kafka-start: setup
	deploy/kafka/kafka.sh start

kafka-stop:
	deploy/kafka/kafka.sh stop

clean:
	rm -rf $(VENV) deploy/kafka/target .local .pytest_cache .mypy_cache .ruff_cache
