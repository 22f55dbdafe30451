# `make demo` and `make test` are the README's quick start: each creates .venv when missing.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo data test bench bench-alternatives sweep reproduce reproduce-quick

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -c .ci/constraints.txt -e ".[test]"
	touch $@

# Debian ships the real Fashion-MNIST; install it when apt is there and the data is not.
$(FASHION_MNIST):
	-if command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -qq dataset-fashion-mnist || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; fi

data: $(FASHION_MNIST)

# `lightning-rigl fit` without a config: RigL 90% ERK, LeNet-300-100, Fashion-MNIST (lightning_rigl/configs/default.yaml).
demo: $(VENV)/.installed data
	$(VENV)/bin/lightning-rigl fit

test: $(VENV)/.installed
	$(PYTHON) -m pytest

bench: $(VENV)/.installed
	$(PYTHON) benchmarks/mask_update.py
	$(PYTHON) benchmarks/step_overhead.py
	$(PYTHON) benchmarks/sparse_inference.py
	$(PYTHON) benchmarks/resume_overhead.py

# The library against the alternatives (BENCHMARKS.md): time per step and peak memory against dense training,
# one mask update beside rigl-torch 0.5.2, and sparse-kernel training beside SparseProp 0.1.14, both installed
# into .bench-deps only for this (never a dependency).
bench-alternatives: $(VENV)/.installed
	$(PYTHON) benchmarks/step_time.py
	$(PYTHON) benchmarks/memory.py
	$(PYTHON) -m pip install --quiet --no-deps --target .bench-deps rigl-torch==0.5.2
	$(PYTHON) benchmarks/vs_rigl_torch.py
	$(PYTHON) -m pip install --quiet --target .bench-deps scipy pybind11
	PYTHONPATH=.bench-deps $(PYTHON) -m pip install --quiet --no-build-isolation --no-deps --target .bench-deps \
		sparseprop==0.1.14
	$(PYTHON) benchmarks/sparse_training.py
	$(PYTHON) benchmarks/sparse_training_step.py

# Test accuracy against sparsity on Fashion-MNIST (dense, Static, SET, RigL); about 8 minutes on 2 cores.
sweep: $(VENV)/.installed data
	$(PYTHON) benchmarks/fashion_mnist_sweep.py

# The paper's claims on the real Fashion-MNIST: every method, 4 sparsities, 3 seeds (about 2 hours on 2 cores);
# writes docs/reproduction.md. Interrupted, it continues where it stopped.
reproduce: $(VENV)/.installed data
	$(PYTHON) benchmarks/reproduce.py --output reproduction --docs docs/reproduction.md

# The same at 90% sparsity with 2 seeds (about 15 minutes).
reproduce-quick: $(VENV)/.installed data
	$(PYTHON) benchmarks/reproduce.py --quick --output reproduction_quick
