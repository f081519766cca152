# Two commands: `make run` (the main job) and `make test` (the whole suite). Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.localsgd-installed
# On a machine without CUDA we install the CPU build of torch first, so pip never pulls the
# multi-GB CUDA wheels; GPU machines get the normal wheel through the package's torch>=2.4.
TORCH_CPU ?= torch==2.13.0
NPROC ?= 2
ARGS ?=

.PHONY: setup run test test-long test-all test-slurm lint bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: setup
	$(VENV)/bin/localsgd-run --nproc-per-node=$(NPROC) $(ARGS)

# `make test` is the suite without two groups that run as CI steps of their own: the end-to-end runs of
# 12 s or more each (torchrun jobs killed and resumed, wheels installed, benchmarks' real runs: `make
# test-long`, about 10 minutes) and the local-Slurm tests (install, configure and start slurmctld/slurmd:
# about 2 minutes, `make test-slurm`). `make test-all` runs the first two.
test: setup
	$(PY) -m pytest -m "not slurm and not long" $(ARGS)

test-long: setup
	$(PY) -m pytest -m "long and not slurm" $(ARGS)

test-all: setup
	$(PY) -m pytest -m "not slurm" $(ARGS)

test-slurm: setup
	$(PY) -m pytest -m slurm tests/test_slurm.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check localsgd tests benchmarks examples build_backend

bench-quick: setup
	$(PY) benchmarks/averaging.py --quick
	$(PY) benchmarks/overhead.py --quick

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
