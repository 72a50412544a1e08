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

DEMO := dream_export/assets/demo
DATA := out/demo-data

.PHONY: setup demo test test-all lint demo-model draft-compare clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[export,dev,serve]'
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

# Retrain the embedded demo from scratch (seeded): the VLM, then its DREAM draft (about 80 min on 2 cores).
demo-model: setup
	$(BIN)/dream-export demo-model -o $(DEMO)/vlm
	$(BIN)/dream-export demo-data -o $(DATA) --train 8000
	$(BIN)/dream-export train-draft $(DEMO)/vlm --data $(DATA)/train.jsonl -o $(DEMO)/draft \
		--features $(DATA)/features --arch dream --steps 6000

# DREAM against EAGLE-2/3-style drafts and the no-cross-attention ablation: same data, same budget.
draft-compare: setup
	for a in eagle2 eagle3; do $(BIN)/dream-export train-draft $(DEMO)/vlm --data $(DATA)/train.jsonl \
		-o out/drafts/$$a --features $(DATA)/features --arch $$a || exit 1; done
	$(BIN)/dream-export train-draft $(DEMO)/vlm --data $(DATA)/train.jsonl -o out/drafts/dream-nocross \
		--features $(DATA)/features --arch dream --no-cross
	$(BIN)/dream-export eval-draft $(DEMO)/vlm --draft $(DEMO)/draft --draft out/drafts/eagle2 \
		--draft out/drafts/eagle3 --draft out/drafts/dream-nocross --data $(DATA)/heldout.jsonl --limit 40 \
		--chain --json out/drafts/compare.json

clean:
	rm -rf out .pytest_cache .ruff_cache
