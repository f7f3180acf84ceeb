# hotswap — the two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
export HOTSWAP_CACHE ?= $(HOME)/.cache/hotswap
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/engine:$(CURDIR)/operator:$(CURDIR)/cluster
export HF_HUB_OFFLINE := 1
export VLLM_HOST_IP := 127.0.0.1

.PHONY: venv lint typecheck test test-unit test-engine cluster-build cluster-up cluster-down demo clean

venv:
	@bash scripts/setup-venv.sh >/dev/null

lint: venv
	$(PY) -m ruff check engine operator cluster tests bench
	$(PY) -m ruff format --check engine operator cluster tests bench
	$(VENV)/bin/lint-imports

typecheck: venv
	$(PY) -m mypy engine/hotswap_engine operator/hotswap_operator

test-unit: venv
	$(PY) -m pytest -q tests/unit

test: venv lint typecheck
	$(PY) -m pytest -q -ra tests
