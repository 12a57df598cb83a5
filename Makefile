# ComfyUI worker: build, run and test. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@echo ">> creating/updating the virtual environment in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed ## Create or reuse the virtual environment with the worker and its test tools

test: venv ## Run the test suite (creates the virtual environment on first use)
	$(PY) -m pytest $(PYTEST_ARGS)

dev: venv ## Run the worker on this machine (no GPU) against the stand-in ComfyUI in tests/standin
	@echo ">> worker in self-hosted mode on http://127.0.0.1:$${API_PORT:-8000}, ComfyUI = the stand-in (tests/standin)"
	COMFYUI_DIR=tests/standin COMFYUI_ARGS="--cpu" DATA_DIR=data/dev MODELS_DIR=data/dev/models \
	WORKER_MODE=http STATE_FILE=data/dev/state.json $(PY) -m supervisor

.PHONY: help venv test dev
