# ComfyUI worker: build, run and test. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# `make dev`'s data (job journal, state, ComfyUI's folders), outside the checkout; KEEP_JOURNAL=1 keeps its jobs.
DEV_DATA ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/comfyui-worker/dev
KEEP_JOURNAL ?=
# The targets leave the checkout as it was cloned: no __pycache__ in it (pytest's cache is off: pyproject.toml's addopts).
export PYTHONDONTWRITEBYTECODE ?= 1

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "venv: the worker needs Python 3.11+; $(PYTHON) is $$($(PYTHON) --version 2>&1 || echo missing): set PYTHON, e.g. make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	@echo ">> creating/updating the virtual environment in $(VENV) with $$($(PYTHON) --version): the worker and its test tools (about a minute the first time; pip is quiet unless something fails)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@echo ">> $(VENV): installing the worker's dependencies and test tools from pyproject.toml"
	@# setuptools' notice about editable installs is information, not a problem of this project: not shown
	@PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[test]'
	@touch $@
	@echo ">> $(VENV) ready"

venv: $(VENV)/.installed ## Create or reuse the virtual environment with the worker and its test tools

test: venv ## Run the test suite (creates the virtual environment on first use)
	$(PY) -m pytest $(PYTEST_ARGS)

dev: venv ## Run the worker on this machine (no GPU) against the stand-in ComfyUI (data: DEV_DATA; KEEP_JOURNAL=1 keeps old jobs)
	@echo ">> worker in self-hosted mode on http://127.0.0.1:$${API_PORT:-8000}, ComfyUI = the stand-in (tests/standin)"
	@echo ">> data in $(DEV_DATA); $(if $(call YES,$(KEEP_JOURNAL)),keeping the job journal of earlier runs,the job journal starts empty (KEEP_JOURNAL=1 keeps it))"
	@$(if $(call YES,$(KEEP_JOURNAL)),:,rm -f "$(DEV_DATA)"/jobs.sqlite3 "$(DEV_DATA)"/jobs.sqlite3-wal "$(DEV_DATA)"/jobs.sqlite3-shm "$(DEV_DATA)"/jobs.sqlite3-journal)
	COMFYUI_DIR=tests/standin COMFYUI_ARGS="--cpu" DATA_DIR="$(DEV_DATA)" MODELS_DIR="$(DEV_DATA)/models" \
	WORKER_MODE=http STATE_FILE="$(DEV_DATA)/state.json" $(PY) -m supervisor

bench: venv ## Benchmarks on the stand-in and the real ComfyUI: a table, bench.json, docs/benchmarks.md (QUICK=1: CI)
	@echo ">> benchmarks against the stand-in and (when prepared: make real-comfyui) the real ComfyUI$(if $(QUICK), (quick))"
	$(PY) scripts/bench.py $(if $(QUICK),--quick)

chaos: venv ## Chaos soak through the self-hosted API: 500 jobs while ComfyUI is killed and stopped (QUICK=1: ~60 jobs; FLEET=2: two workers on PostgreSQL)
	@echo ">> chaos soak on loopback$(if $(QUICK), (quick))"
	$(PY) scripts/chaos.py $(if $(QUICK),--quick) $(if $(FLEET),--fleet $(FLEET))

.PHONY: help venv test dev bench chaos

# Whether a yes/no variable says yes (1, true or yes).
YES = $(filter 1 true yes TRUE YES True Yes,$(1))

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
# into a CUDA image; docs/image.md explains every variable. BuildKit is required (RUN --mount): `make build` uses
# DOCKER when it was set, else the first client that can (docker/buildkit-client.sh: `docker` with buildx, or
# the engine's own /usr/bin/docker), and says in one line what to install or set when there is none.
DOCKER ?= docker
BUILD_DOCKER = $(eval BUILD_DOCKER := $$(shell bash docker/buildkit-client.sh $(if $(filter file,$(origin DOCKER)),,'$(DOCKER)')))$(BUILD_DOCKER)
REGISTRY ?=
IMAGE ?= comfyui-worker
TAG ?= latest
IMAGE_REF = $(if $(REGISTRY),$(REGISTRY)/)$(IMAGE):$(TAG)
BASE_IMAGE ?= nvidia/cuda:12.8.1-base-ubuntu24.04
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
VARIANT_BUILD_ARGS ?=
# One layer per model file (scripts/model_layers.py): `make build` builds a copy of DOCKERFILE whose model block is
# generated from MODELS_MANIFEST (a path inside CONTEXT) into CONTEXT/build/model-layers/ (git ignores build/),
# removed after a good build, kept after a failed one for a look. MODEL_GROUP_MB > 0 lets consecutive small files (known sizes) share a layer up to that many MiB.
# MODEL_LAYERS=no builds DOCKERFILE as it is (every model in one layer).
MODELS_MANIFEST ?= models.yaml
MODEL_GROUP_MB ?= 0
MODEL_LAYERS ?= yes
MODEL_LAYERS_DIR = $(CONTEXT)/build/model-layers
BUILD_DOCKERFILE = $(if $(call YES,$(MODEL_LAYERS)),$(MODEL_LAYERS_DIR)/Dockerfile,$(DOCKERFILE))
CLEAN_MODEL_LAYERS = $(if $(call YES,$(MODEL_LAYERS)),rm -rf $(MODEL_LAYERS_DIR); rmdir $(CONTEXT)/build 2>/dev/null,:) || true
MODEL_LAYERS_CMD = $(PYTHON) scripts/model_layers.py --manifest $(CONTEXT)/$(MODELS_MANIFEST) --dockerfile $(DOCKERFILE) \
	--context $(CONTEXT) --out $(MODEL_LAYERS_DIR) --group-mb $(MODEL_GROUP_MB)

# What the image says it is (its BUILD_* ENV and labels): this checkout's commit (with -dirty when tracked files
# are modified), its `origin` URL without credentials, the build time (SOURCE_DATE_EPOCH when set; computed once,
# so both passes of `make build` say the same). LABELS=no skips the labels pass (a --target stage has no record).
BUILD_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null)$(if $(shell git status --porcelain --untracked-files=no 2>/dev/null),-dirty)
BUILD_SOURCE ?= $(shell git remote get-url origin 2>/dev/null | sed -E 's|^([a-z+]+://)[^/@]*@|\1|')
BUILD_CREATED ?= $(eval BUILD_CREATED := $$(shell date -u $(if $(SOURCE_DATE_EPOCH),-d @$(SOURCE_DATE_EPOCH)) +%Y-%m-%dT%H:%M:%SZ))$(BUILD_CREATED)
LABELS ?= $(if $(findstring --target,$(BUILD_FLAGS)),no,yes)
STAMP_ARGS = --build-arg BUILD_REVISION=$(BUILD_REVISION) --build-arg 'BUILD_SOURCE=$(BUILD_SOURCE)' \
	--build-arg BUILD_CREATED=$(BUILD_CREATED)

# $(call BUILD_CMD,MORE): the build, with MORE build args (the stamp of pass 1, the labels of pass 2).
BUILD_CMD = DOCKER_BUILDKIT=1 $(BUILD_DOCKER) build --progress=$(PROGRESS) -f $(BUILD_DOCKERFILE) -t $(IMAGE_REF) \
	--build-arg BASE_IMAGE=$(BASE_IMAGE) $(if $(COMFYUI_REF),--build-arg COMFYUI_REF=$(COMFYUI_REF)) \
	$(SECRET_FLAGS) $(VARIANT_BUILD_ARGS) $(BUILD_ARGS) $(BUILD_FLAGS) $(1) $(CONTEXT)
# Pass 2 of `make build`: the labels, computed from the build record the image of pass 1 holds
# (supervisor/build_record.py), set by building again: every layer cached, only the image's metadata changes.
RECORD_IN_IMAGE = /opt/worker/build-record.json
LABEL_PASS = set -eo pipefail; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; started=$$SECONDS; \
	first=$$($(BUILD_DOCKER) image inspect -f '{{.Id}}' $(IMAGE_REF)); \
	echo ">> labels: from the build record in the image ($(RECORD_IN_IMAGE)), set by a second build (every layer cached)"; \
	$(BUILD_DOCKER) run --rm --entrypoint cat "$$first" $(RECORD_IN_IMAGE) > "$$work/record.json" \
		|| { echo "build: the image has no readable $(RECORD_IN_IMAGE) (above), so no labels; LABELS=no builds without them" >&2; exit 1; }; \
	$(PYTHON) -m supervisor.build_record build-args "$$work/record.json" --revision '$(BUILD_REVISION)' \
		--source '$(BUILD_SOURCE)' --created '$(BUILD_CREATED)' > "$$work/label-args"; \
	labels=(); while IFS= read -r arg; do labels+=(--build-arg "$$arg"); done < "$$work/label-args"; \
	$(strip $(call BUILD_CMD,"$${labels[@]}")) > "$$work/labels.log" 2>&1 || { cat "$$work/labels.log" >&2; exit 1; }; \
	[ "$$first" = "$$($(BUILD_DOCKER) image inspect -f '{{.Id}}' $(IMAGE_REF))" ] || $(BUILD_DOCKER) image rm "$$first" > /dev/null 2>&1 || true; \
	took=$$((SECONDS - started)); [ "$$took" -gt 0 ] || took='under 1'; \
	echo ">> labels: $$(grep -c '=.' "$$work/label-args") set in $$took s (docker inspect $(IMAGE_REF))"
CONTAINER ?= comfyui-worker
RUN_CMD = $(DOCKER) run --rm --name $(CONTAINER) $(if $(GPUS),--gpus $(GPUS)) -p $(HOST_ADDR):$(PORT):8000 \
	--env-file $(ENV_FILE) -v $(DATA_VOLUME):/data $(RUN_FLAGS) $(IMAGE_REF)

build: ## Build the image REGISTRY/IMAGE:TAG (BASE_IMAGE, COMFYUI_REF, HF_TOKEN_FILE, BUILD_ARGS, ... see docs/image.md)
	@for f in $(HF_TOKEN_FILE) $(CIVITAI_TOKEN_FILE); do test -r "$$f" || { echo "build: the secret file $$f cannot be read" >&2; exit 1; }; done
	@test -n "$(BUILD_DOCKER)" || exit 1  # docker/buildkit-client.sh said why, in one line
	@echo ">> building $(IMAGE_REF) from $(DOCKERFILE) on $(BASE_IMAGE) with $(BUILD_DOCKER) (context $(CONTEXT); secrets: $(or $(SECRET_IDS),none))"
	$(if $(call YES,$(MODEL_LAYERS)),$(MODEL_LAYERS_CMD))
	$(strip $(call BUILD_CMD,$(STAMP_ARGS)))
	@$(if $(call YES,$(LABELS)),$(LABEL_PASS),echo ">> no labels (LABELS=$(LABELS))")
	@$(CLEAN_MODEL_LAYERS)
	@echo ">> built $(IMAGE_REF)"

push: ## Push REGISTRY/IMAGE:TAG to its registry (`docker login` to it first); prints each layer: uploaded or already there, and its size
	@test -n "$(REGISTRY)" || { echo "push: REGISTRY is not set; e.g. make push REGISTRY=docker.io/you TAG=v1" >&2; exit 1; }
	@echo ">> pushing $(IMAGE_REF)"
	@set -o pipefail; log=$$(mktemp); trap 'rm -f "$$log"' EXIT; \
	$(DOCKER) push $(IMAGE_REF) | tee "$$log"; \
	$(PYTHON) scripts/push_report.py --log "$$log" --image $(IMAGE_REF) --docker $(DOCKER)

run: ## Run the image self-hosted: --gpus all, API on HOST_ADDR:PORT, env from ENV_FILE, data in DATA_VOLUME
	@test -r "$(ENV_FILE)" || { echo "run: no env file $(ENV_FILE); start from docker/worker.env.example (cp docker/worker.env.example .env)" >&2; exit 1; }
	@echo ">> running $(IMAGE_REF): API on http://$(HOST_ADDR):$(PORT), GPUs: $(or $(GPUS),none), env from $(ENV_FILE), data volume $(DATA_VOLUME) at /data"
	$(strip $(RUN_CMD))

test-image: venv ## Build the image's test variant (no GPU, no torch, stand-in ComfyUI) and check it (needs an engine)
	@echo ">> image tests: a test build of $(DOCKERFILE) with /usr/bin/docker + BuildKit, then run and inspect it (tests/image)"
	$(PY) -m pytest tests/image -m "not real_image" $(PYTEST_ARGS)

test-real-image: venv real-comfyui ## Build the image with the real ComfyUI, node packs and torch, run jobs on the CPU (4-8 min cold, ~3 warm; not in make test)
	@echo ">> real image test: $(DOCKERFILE) with ComfyUI and packs from ../shared/upstream, torch from PyPI, tiny models (tests/image -m real_image)"
	$(PY) -m pytest tests/image -m real_image $(PYTEST_ARGS)

.PHONY: build push run test-image test-real-image

# ------------------------------------------------------------------------------------------------ a CPU image
# A small image of your own, without a GPU: docker/Dockerfile with no CUDA base, no torch, the stand-in
# (tests/standin) as ComfyUI, no models and no custom nodes (docker/cpu/). Its base, CPU_BASE_IMAGE, is by default
# a Debian made on this machine with debootstrap (docker/ci/base-image.sh: root, a Debian/Ubuntu host, no
# registry needed); with Docker Hub at hand, CPU_BASE_IMAGE=debian:bookworm-slim works too.
CPU_IMAGE ?= comfyui-worker-cpu
CPU_BASE_IMAGE ?= local/bookworm:base
CPU_PORT ?= $(PORT)
CPU_CONTAINER ?= comfyui-worker-cpu
# What the stand-in imports (the worker's own pins, so pip's cache serves both venvs).
STANDIN_PACKAGES = requests aiohttp==3.14.5 Pillow==13.0.0 PyYAML==6.0.3
CPU_BUILD_ARGS = --build-arg COMFYUI_SOURCE=local --build-arg COMFYUI_LOCAL_DIR=tests/standin \
	--build-arg TORCH_PACKAGES= --build-arg SYSTEM_PACKAGES= --build-arg 'COMFYUI_EXTRA_PACKAGES=$(STANDIN_PACKAGES)' \
	--build-arg MODELS_MANIFEST=docker/cpu/models.yaml --build-arg NODES_MANIFEST=docker/cpu/custom_nodes.txt
CPU_RUN_CMD = $(DOCKER) run --rm --name $(CPU_CONTAINER) -p $(HOST_ADDR):$(CPU_PORT):8000 -e COMFYUI_ARGS=--cpu \
	-e ALLOW_UNAUTHENTICATED=true $(RUN_FLAGS) $(CPU_IMAGE):$(TAG)

build-cpu: export VARIANT_BUILD_ARGS = $(CPU_BUILD_ARGS)
build-cpu: ## Build a CPU image of your own, CPU_IMAGE:TAG: the stand-in as ComfyUI, no CUDA, no torch, no models
	@test -n "$(BUILD_DOCKER)" || exit 1  # docker/buildkit-client.sh said why, in one line
	@$(if $(filter local/%,$(CPU_BASE_IMAGE)),DOCKER=$(BUILD_DOCKER) BASE_TAG=$(CPU_BASE_IMAGE) bash docker/ci/base-image.sh \
		|| { echo "build-cpu: the base image $(CPU_BASE_IMAGE) could not be made (above); with Docker Hub at hand: make build-cpu CPU_BASE_IMAGE=debian:bookworm-slim" >&2; exit 1; },:)
	@$(MAKE) --no-print-directory build IMAGE=$(CPU_IMAGE) BASE_IMAGE=$(CPU_BASE_IMAGE) REGISTRY= MODELS_MANIFEST=docker/cpu/models.yaml

run-cpu: ## Run the CPU image on http://HOST_ADDR:CPU_PORT (loopback only: it serves without an API key)
	@case "$(HOST_ADDR)" in 127.*|localhost|::1) ;; *) echo "run-cpu: serves without an API key, so only on a loopback HOST_ADDR (127.0.0.1), not $(HOST_ADDR); for more, run it like the GPU image: make run GPUS= IMAGE=$(CPU_IMAGE) (API_KEY in $(ENV_FILE))" >&2; exit 1;; esac
	@echo ">> running $(CPU_IMAGE):$(TAG) (the stand-in ComfyUI, CPU): API on http://$(HOST_ADDR):$(CPU_PORT), no API key; Ctrl-C stops it"
	$(strip $(CPU_RUN_CMD))

.PHONY: build-cpu run-cpu
