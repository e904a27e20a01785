# The two set-up commands of the README: `make demo` and `make test`. Both work from nothing:
# they create .venv, install CPU torch first (a looser spec would pull a multi-GB CUDA build),
# then the project with its pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
DEMO_MODEL := models/demo

# The container image (deploy/Dockerfile), built from a wheelhouse made here, so the build itself
# needs no network; `make image IMAGE=... BASE_IMAGE=... EPD_EXTRAS=nixl TORCH_INDEX_URL=...
# IMAGE_PYTHON=3.12` for other variants (deploy/README.md).
IMAGE ?= epd:0.1.0-cpu
BASE_IMAGE ?= python:3.11.14-slim-bookworm
EPD_EXTRAS ?=
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
IMAGE_PYTHON ?=
WHEELHOUSE := build/wheelhouse

.PHONY: venv demo test lint proto clean wheelhouse image test-deploy

venv: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,nixl,gpu]'
	$(BIN)/python -m services.language.kernels.cpu_ext  # the C++ CPU kernels, built once
	$(BIN)/python tests/reference/install_torchvision.py  # transformers' video processor (tests)
	rm -f $(VENV)/.installed-*
	touch $@

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(BIN)/epd make-tiny-model $(DEMO_MODEL) --preset tiny

demo: $(STAMP) $(DEMO_MODEL)/config.json
	$(BIN)/epd demo --model $(DEMO_MODEL) --image assets/sample.png \
		--prompt "Describe this image." --max-tokens 24

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common services bench

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

wheelhouse: $(STAMP)
	PIP=$(BIN)/pip EPD_EXTRAS='$(EPD_EXTRAS)' TORCH_VERSION=$(TORCH_VERSION) \
		TORCH_INDEX_URL='$(TORCH_INDEX_URL)' IMAGE_PYTHON='$(IMAGE_PYTHON)' \
		deploy/scripts/wheelhouse.sh $(WHEELHOUSE)

# Installs and starts a Docker engine if none answers, and makes a base image with mmdebstrap if
# BASE_IMAGE is neither local nor pullable. The legacy builder suffices: the context is the
# wheelhouse, so no .dockerignore is needed.
image: wheelhouse
	deploy/scripts/docker-engine.sh
	base=$$(deploy/scripts/base-image.sh '$(BASE_IMAGE)') && \
		DOCKER_BUILDKIT=0 docker build --quiet -f deploy/Dockerfile -t $(IMAGE) \
		--build-arg BASE_IMAGE=$$base --build-arg TORCH_VERSION=$(TORCH_VERSION) $(WHEELHOUSE)
	docker image ls $(IMAGE)

# The compose stack for real, on this machine's Docker engine (tests/docker): under 10 minutes,
# and it removes its containers, volumes and network whatever happens (pytest's teardown, and
# this shell's trap if pytest itself dies). Not part of `make test`.
COMPOSE_PROJECT := epd-test-deploy
test-deploy: image
	trap '$(BIN)/python -m tests.docker.stack down $(COMPOSE_PROJECT)' EXIT INT TERM; \
		EPD_IMAGE=$(IMAGE) EPD_COMPOSE_PROJECT=$(COMPOSE_PROJECT) \
		$(BIN)/python -m pytest -q -s tests/docker

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Icommon/rpc=proto --python_out=. --grpc_python_out=. \
		--pyi_out=. proto/*.proto

clean:
	rm -rf $(VENV) models build .pytest_cache .ruff_cache .mypy_cache
