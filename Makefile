# uapt: `make demo` (set up + the embedded demo) and `make test` (set up + the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tests never touch the network: the Hub and W&B are offline.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test test-fast lint format uat bench gpu-check gpu-wheels clean slurm-packages cluster-start cluster-stop

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# tests/test_slurm.py runs a one-node SLURM cluster with accounting from Debian's packages
# (docs/cluster.md). As root (CI) they are installed when missing, with their system services kept
# from starting (policy-rc.d); otherwise the missing programs are named and the SLURM tests fail.
SLURM_PACKAGES := slurmctld slurmd slurmdbd slurm-client munge mariadb-server
SLURM_PROGRAMS := slurmctld slurmd slurmdbd sbatch munged mariadbd
slurm-packages:
	@missing=$$(for p in $(SLURM_PROGRAMS); do \
	  PATH="$$PATH:/usr/sbin" command -v $$p >/dev/null || echo $$p; done); \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "not found: $$missing; the SLURM tests need $(SLURM_PACKAGES)"; exit 0; fi; \
	echo "installing $(SLURM_PACKAGES)"; \
	guard=/usr/sbin/policy-rc.d; ours=; \
	if [ ! -e $$guard ]; then printf '#!/bin/sh\nexit 101\n' > $$guard; chmod +x $$guard; ours=1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	install="apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES)"; \
	$$install >/dev/null 2>&1 || { apt-get update -qq && $$install >/dev/null; }; status=$$?; \
	[ -z "$$ours" ] || rm -f $$guard; exit $$status

# The same cluster by hand, in $(CLUSTER_DIR): start prints the `export SLURM_CONF=...` to use it.
CLUSTER_DIR ?= .slurm
cluster-start: slurm-packages
	@$(PYTHON) tests/slurm_cluster.py start $(CLUSTER_DIR)

cluster-stop:
	@$(PYTHON) tests/slurm_cluster.py stop $(CLUSTER_DIR)

demo: setup
	$(BIN)/uapt-train sweep=demo
	$(BIN)/uapt-table experiments/demo.yaml --runs runs --plot runs/plots/demo

# Test files run in parallel, one file per worker (their module fixtures stay whole), each worker
# on one thread so that workers do not contend for the cores (measured: 12 min on 2 idle cores, 20.5
# serially). TEST_WORKERS=1 runs them one after another.
TEST_WORKERS ?= 2
test: setup slurm-packages
	$(OFFLINE) OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile tests uat -m "not full"

# The fast lane (tests not marked slow in their files): the one to run while developing. One
# thread: two OpenMP threads on 2 shared cores spin-wait on each other (docs/performance.md).
test-fast: setup
	$(OFFLINE) OMP_NUM_THREADS=1 $(BIN)/pytest -q tests -m "not slow"

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

# uapt's CUDA paths checked and measured (benchmarks/gpu_check/; docs/performance.md, "GPU").
gpu-check: setup
	$(OFFLINE) $(BIN)/python benchmarks/gpu_check --json runs/benchmarks/gpu_check.json

# The wheels gpu_check needs on a GPU machine without a package index (Python 3.12, x86-64),
# into $(WHEELS): binary ones as published; sdist-only ones (pure Python) built here.
WHEELS ?= .whl
MANYLINUX := $(foreach v,2_28 2_27 2_17,--platform manylinux_$(v)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: setup
	rm -rf $(WHEELS)
	$(BIN)/pip download --quiet --no-deps --python-version 3.12 --implementation cp $(MANYLINUX) \
		--dest $(WHEELS) -r benchmarks/gpu_requirements.txt
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir $(WHEELS) $$(find $(WHEELS) -name '*.tar.gz' -o -name '*.zip')
	find $(WHEELS) -name '*.tar.gz' -delete -o -name '*.zip' -delete
	du -sh $(WHEELS)

clean:
	rm -rf runs .cache
