PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
ARTIFACTS ?= artifacts
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install demo run serve eval test test-all test-gpu bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# one compute thread unless THREADS says otherwise: on a busy 2-core machine torch's default (2) made the
# demo's training steps ~20x slower than 1
THREADS ?= 1
demo: install
	OMP_NUM_THREADS=$(THREADS) $(BIN)/twinserve demo --zoo $(ARTIFACTS)/zoo -o $(ARTIFACTS)/demo

run: demo
	$(BIN)/twinserve serve $(ARTIFACTS)/demo --host $(HOST) --port $(PORT)

eval: demo
	$(BIN)/twinserve eval $(ARTIFACTS)/demo

test: install
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# CUDA checks (tests/gpu): skipped where torch sees no GPU; never part of `make test`
test-gpu: install
	$(BIN)/python -m pytest -m gpu tests/gpu -q $(PYTEST_ARGS)

bench: demo
	$(BIN)/twinserve bench $(ARTIFACTS)/demo --out $(ARTIFACTS)/bench.json

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(ARTIFACTS) $(VENV)
