# cot2: `make demo` runs the MNNS pipeline end to end, `make test` the test suite.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slurm demo bench lint

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,sweep]"
	@touch $(STAMP)

test: install
	$(VENV)/bin/pytest

# Opt-in: a one-node SLURM cluster on this machine (installs slurm-wlm when missing, needs root),
# a submitit_slurm sweep through it, then the daemons are stopped, also when the test fails.
SLURM_DIR ?= /tmp/cot2-slurm
test-slurm: install
	tests/slurm_cluster.sh run $(SLURM_DIR) -- $(VENV)/bin/pytest -m slurm tests/test_slurm.py

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m cot2cli.bench
