# dream-export developer entry points. `make demo` and `make test` work on a fresh clone with only
# Python 3.10+ and pip: each sets up .venv first (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The CPU build of torch: on the project's machines this exact wheel lies on local disk; an unpinned
# torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test test-all lint demo-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[export,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(BIN)/dream-export demo --out out/demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: setup
	$(BIN)/ruff check dream_export tests

demo-model: setup
	$(BIN)/dream-export demo-model

clean:
	rm -rf out .pytest_cache .ruff_cache
