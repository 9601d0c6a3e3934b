# Everything a fresh machine needs: `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned: a bare `torch` pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast test-hpc bench lint docs clean

# imgindex/__init__.py holds the version: a bump reinstalls the metadata too.
$(BIN)/imgindex: setup.cfg pyproject.toml imgindex/__init__.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,dev,fast,docs]"
	touch $@

demo: $(BIN)/imgindex
	$(BIN)/python demo/make_data.py demo-data
	$(BIN)/imgindex build demo-data/photos demo-data/synthetic --out demo-index
	$(BIN)/imgindex info demo-index/photos
	$(BIN)/imgindex search demo-index/photos demo-data/queries/*.jpg -k 3

# --durations: the slowest tests in every log, CI's included.
test: $(BIN)/imgindex
	$(BIN)/python -m pytest -q --durations=20

# No cluster, process, server or browser (the `slow` marker): under 2 minutes.
test-fast: $(BIN)/imgindex
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

# A real one-node SLURM in a loopback-only network namespace (root; installs
# slurm-wlm and munge if absent): the HPC guide's sbatch script and --jobqueue slurm.
test-hpc: $(BIN)/imgindex
	tests/hpc/run.sh

bench: $(BIN)/imgindex
	$(BIN)/python bench/throughput.py

# Offline, warnings as errors; runs docs/examples/quickstart.ipynb on a LocalCluster.
docs: $(BIN)/imgindex
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

lint: $(BIN)/imgindex
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf demo-data demo-index bench-data .pytest_cache docs/_build docs/_generated docs/jupyter_execute
