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

bench: venv ## Benchmarks on the stand-in and the real ComfyUI: a table, bench.json, docs/benchmarks.md (QUICK=1: CI)
	@echo ">> benchmarks against the stand-in and (when prepared: make real-comfyui) the real ComfyUI$(if $(QUICK), (quick))"
	$(PY) scripts/bench.py $(if $(QUICK),--quick)

chaos: venv ## Chaos soak through the self-hosted API: 500 jobs while ComfyUI is killed and stopped (QUICK=1: ~60 jobs)
	@echo ">> chaos soak on loopback$(if $(QUICK), (quick))"
	$(PY) scripts/chaos.py $(if $(QUICK),--quick)

.PHONY: help venv test dev bench chaos

# ------------------------------------------------------------------------------------------------ the real ComfyUI
# ComfyUI 0.3.64 and the pinned node packs from ../shared/upstream/, in a CPU venv cached under
# ~/.cache/comfyui-worker/real-comfyui/<key> (REAL_COMFYUI_CACHE, REAL_COMFYUI_UPSTREAM; docs/real-comfyui.md).
real-comfyui: venv ## Prepare the real ComfyUI for test-real and bench (cached; ~3 min and ~3 GB the first time)
	$(PY) scripts/real_comfyui.py

test-real: venv ## Run the real tier: the tests marked `real`, against the real ComfyUI on the CPU
	@$(PY) scripts/real_comfyui.py --locate >/dev/null
	$(PY) -m pytest -m real $(PYTEST_ARGS)

.PHONY: real-comfyui test-real

# ------------------------------------------------------------------------------------------------ the image
# `make build` bakes ComfyUI, the pinned custom nodes (custom_nodes.txt) and the verified models (models.yaml)
# into a CUDA image; docs/image.md explains every variable. BuildKit is required (RUN --mount); where the
# `docker` client has no buildx, use the engine's own client: DOCKER=/usr/bin/docker.
DOCKER ?= docker
REGISTRY ?=
IMAGE ?= comfyui-worker
TAG ?= latest
IMAGE_REF = $(if $(REGISTRY),$(REGISTRY)/)$(IMAGE):$(TAG)
BASE_IMAGE ?= nvidia/cuda:12.8.1-runtime-ubuntu24.04
COMFYUI_REF ?=
DOCKERFILE ?= docker/Dockerfile
CONTEXT ?= .
PROGRESS ?= auto
HF_TOKEN_FILE ?=
CIVITAI_TOKEN_FILE ?=
BUILD_ARGS ?=
BUILD_FLAGS ?=
ENV_FILE ?= .env
DATA_VOLUME ?= comfyui-worker-data
HOST_ADDR ?= 127.0.0.1
PORT ?= 8000
GPUS ?= all
RUN_FLAGS ?=

comma := ,
SECRET_FLAGS = $(if $(HF_TOKEN_FILE),--secret id=HF_TOKEN$(comma)src=$(HF_TOKEN_FILE)) \
               $(if $(CIVITAI_TOKEN_FILE),--secret id=CIVITAI_TOKEN$(comma)src=$(CIVITAI_TOKEN_FILE))
SECRET_IDS = $(strip $(if $(HF_TOKEN_FILE),HF_TOKEN) $(if $(CIVITAI_TOKEN_FILE),CIVITAI_TOKEN))

BUILD_CMD = DOCKER_BUILDKIT=1 $(DOCKER) build --progress=$(PROGRESS) -f $(DOCKERFILE) -t $(IMAGE_REF) \
	--build-arg BASE_IMAGE=$(BASE_IMAGE) $(if $(COMFYUI_REF),--build-arg COMFYUI_REF=$(COMFYUI_REF)) \
	$(SECRET_FLAGS) $(BUILD_ARGS) $(BUILD_FLAGS) $(CONTEXT)
CONTAINER ?= comfyui-worker
RUN_CMD = $(DOCKER) run --rm --name $(CONTAINER) $(if $(GPUS),--gpus $(GPUS)) -p $(HOST_ADDR):$(PORT):8000 \
	--env-file $(ENV_FILE) -v $(DATA_VOLUME):/data $(RUN_FLAGS) $(IMAGE_REF)

build: ## Build the image REGISTRY/IMAGE:TAG (BASE_IMAGE, COMFYUI_REF, HF_TOKEN_FILE, BUILD_ARGS, ... see docs/image.md)
	@echo ">> building $(IMAGE_REF) from $(DOCKERFILE) on $(BASE_IMAGE) (context $(CONTEXT); secrets: $(or $(SECRET_IDS),none))"
	@for f in $(HF_TOKEN_FILE) $(CIVITAI_TOKEN_FILE); do test -r "$$f" || { echo "build: the secret file $$f cannot be read" >&2; exit 1; }; done
	$(strip $(BUILD_CMD))
	@echo ">> built $(IMAGE_REF)"

push: ## Push REGISTRY/IMAGE:TAG to its registry (`docker login` to it first)
	@test -n "$(REGISTRY)" || { echo "push: REGISTRY is not set; e.g. make push REGISTRY=docker.io/you TAG=v1" >&2; exit 1; }
	@echo ">> pushing $(IMAGE_REF)"
	$(DOCKER) push $(IMAGE_REF)

run: ## Run the image self-hosted: --gpus all, API on HOST_ADDR:PORT, env from ENV_FILE, data in DATA_VOLUME
	@test -r "$(ENV_FILE)" || { echo "run: no env file $(ENV_FILE); start from docker/worker.env.example (cp docker/worker.env.example .env)" >&2; exit 1; }
	@echo ">> running $(IMAGE_REF): API on http://$(HOST_ADDR):$(PORT), GPUs: $(or $(GPUS),none), env from $(ENV_FILE), data volume $(DATA_VOLUME) at /data"
	$(strip $(RUN_CMD))

test-image: venv ## Build the image's test variant (no GPU, no torch, stand-in ComfyUI) and check it (needs an engine)
	@echo ">> image tests: a test build of $(DOCKERFILE) with /usr/bin/docker + BuildKit, then run and inspect it (tests/image)"
	$(PY) -m pytest tests/image $(PYTEST_ARGS)

.PHONY: build push run test-image
