# The two set-up commands of the README: `make demo` and `make test`. Both work from nothing:
# they create .venv, install CPU torch first (a looser spec would pull a multi-GB CUDA build),
# then the project with its pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
DEMO_MODEL := models/demo

.PHONY: venv demo test lint proto clean

venv: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,nixl,gpu]'
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

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Icommon/rpc=proto --python_out=. --grpc_python_out=. \
		--pyi_out=. proto/*.proto

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache .mypy_cache
