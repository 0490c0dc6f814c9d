# Fresh clone -> `make repro` or `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU machines take torch 2.13.0 (a CPU build); set TORCH_SPEC= to keep a torch you installed.
TORCH_SPEC ?= torch==2.13.0
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install repro test lint clean bench bench-learning

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no CUDA here: installing $(TORCH_SPEC) first"; $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/bench.py

bench-learning: install
	$(BIN)/python benchmarks/learning.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
