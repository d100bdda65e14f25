# Everything installs into .venv and deploy/kafka/target; nothing is needed by hand beyond
# Python 3.11+, Java 17, Maven and Go (kustomize for the Kubernetes kit's validator).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The Kafka releases the broker tests run on (worker/tools/devstack.py KAFKA_VERSIONS; the
# first is the default broker), each resolved by Maven into deploy/kafka/target/<version>/libs.
KAFKA_VERSIONS := 3.9.1 4.4.0
KAFKA_JARS := $(foreach v,$(KAFKA_VERSIONS),deploy/kafka/target/$(v)/libs/.complete)
PYTEST_ARGS ?=

.PHONY: setup demo dev test lint typecheck docs unit bench bench-quick clean kafka-start kafka-stop \
	k8s-tools k8s-validate lock

setup: $(STAMP) $(KAFKA_JARS)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,otel]'
	touch $(STAMP)

deploy/kafka/target/%/libs/.complete: deploy/kafka/pom.xml
	deploy/kafka/kafka.sh fetch --version $*

# The Kubernetes kit's validator (tests/k8s_validate.py): kustomize, built with Go from its
# module at a pinned version into .venv/bin (about 40 s once, then cached), and the strict
# Kubernetes JSON schemas that the kubernetes-validate package ships.
KUSTOMIZE_VERSION := v5.8.1
KUBERNETES_VALIDATE_VERSION := 1.37.0
K8S_TOOLS := $(VENV)/.k8s-tools-$(KUSTOMIZE_VERSION)-$(KUBERNETES_VALIDATE_VERSION)

$(K8S_TOOLS): $(STAMP)
	GOBIN=$(abspath $(BIN)) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	$(BIN)/python -m pip install --quiet kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
	touch $@

k8s-tools: $(K8S_TOOLS)

# kustomize build of the base and each overlay, every object checked against its schema.
k8s-validate: $(K8S_TOOLS)
	$(BIN)/python -m tests.k8s_validate

# The AsyncAPI CLI that validates schemas/asyncapi.yaml (tests/test_asyncapi.py), at the exact
# version of tools/asyncapi/package.json and its lock: npm ci (no install scripts), about
# 45 s once, then cached by a stamp.
ASYNCAPI_TOOLS := tools/asyncapi/node_modules/.installed-stamp

$(ASYNCAPI_TOOLS): tools/asyncapi/package.json tools/asyncapi/package-lock.json
	cd tools/asyncapi && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

asyncapi-tools: $(ASYNCAPI_TOOLS)

# The Java example's libraries (examples/java/pom.xml: the Kafka client, Jackson, slf4j) in
# examples/java/target/libs; tests/test_example_java.py runs the example from its source.
JAVA_EXAMPLE_LIBS := examples/java/target/libs/.complete

$(JAVA_EXAMPLE_LIBS): examples/java/pom.xml
	rm -rf examples/java/target/libs
	mvn -q -B -f examples/java/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory=$(abspath examples/java/target/libs)
	touch $@

java-example: $(JAVA_EXAMPLE_LIBS)

.PHONY: asyncapi-tools java-example

# The container's lock file (deploy/container/requirements.lock): every runtime dependency
# of pyproject.toml resolved to one version with its hashes, for the image's Python 3.11.
UV_VERSION := 0.13.8
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --annotation-style line --quiet \
		--output-file deploy/container/requirements.lock

demo: setup
	$(BIN)/cancel-worker demo

# Kafka on 127.0.0.1:9092, the simulator on :8765 (seeded from deploy/dev/) and the worker,
# on the worker's defaults, until Ctrl-C (README, "Run it by hand").
dev: setup
	$(BIN)/cancel-worker dev

lint: $(STAMP)
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/) into site/ (git-ignored); --strict fails on a
# broken link or anchor.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet

unit: $(STAMP)
	$(BIN)/pytest -m "not integration and not e2e" $(PYTEST_ARGS)

test: setup $(K8S_TOOLS) $(ASYNCAPI_TOOLS) $(JAVA_EXAMPLE_LIBS) lint typecheck docs
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
	rm -rf $(VENV) deploy/kafka/target .local .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		site tools/asyncapi/node_modules examples/java/target
