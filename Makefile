# uapt: `make demo` (set up + the embedded demo) and `make test` (set up + the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tests never touch the network: the Hub and W&B are offline.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint format uat bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/uapt-train sweep=demo
	$(BIN)/uapt-table experiments/demo.yaml --runs runs --plot runs/plots/demo

test: setup
	$(OFFLINE) $(BIN)/pytest -q tests uat -m "not full"

uat: setup
	$(BIN)/pytest -q uat

lint: setup
	$(BIN)/ruff check src tests benchmarks uat
	$(BIN)/ruff format --check src tests benchmarks uat

format: setup
	$(BIN)/ruff format src tests benchmarks uat
	$(BIN)/ruff check --fix src tests benchmarks uat

bench: setup
	$(OFFLINE) $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .cache
