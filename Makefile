# Set-up and checks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint

# Re-install only when pyproject.toml changes. torch/torchvision come from PyPI as pip resolves
# them (no CPU-only index: torchvision must match torch).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -U pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/spo demo

test: venv
	$(BIN)/ruff check . && $(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check .
