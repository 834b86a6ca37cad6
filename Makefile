# cot2: `make demo` runs the MNNS pipeline end to end, `make test` the test suite.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
COT2 := $(VENV)/bin/cot2

.PHONY: install test test-slurm demo bench lint

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,sweep]"
	@touch $(STAMP)

test: install
	$(VENV)/bin/pytest

# The MNNS pipeline end to end in a fresh outputs/demo/<time>/: data, discrete and CoT2 training,
# GRPO from the CoT2 run, evaluation with pass@k, and the report table with its plots.
demo: install
	@set -e; export COT2_OUTPUTS=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S); \
	$(COT2) generate task=mnns; \
	$(COT2) train experiment=demo method=discrete run.name=discrete; \
	$(COT2) train experiment=demo method=cot2 run.name=cot2; \
	$(COT2) rl init_from=cot2 rl=mts rl.K=3 rl.epochs=1 rl.prompts_per_epoch=2048 run.name=grpo; \
	$(COT2) eval run=discrete checkpoint=last eval.pass_k=[1,4,16] eval.temperatures=[1.0] eval.n_samples=16; \
	$(COT2) eval run=cot2 eval.pass_k=[1,4,16] eval.temperatures=[1.0] eval.n_samples=16 eval.mts_K=[3]; \
	$(COT2) report $$COT2_OUTPUTS/runs --out $$COT2_OUTPUTS/report

# Opt-in: a one-node SLURM cluster on this machine (installs slurm-wlm when missing, needs root),
# a submitit_slurm sweep through it, then the daemons are stopped, also when the test fails.
SLURM_DIR ?= /tmp/cot2-slurm
test-slurm: install
	tests/slurm_cluster.sh run $(SLURM_DIR) -- $(VENV)/bin/pytest -m slurm tests/test_slurm.py

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m cot2cli.bench
