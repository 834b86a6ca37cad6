# cot2: `make demo` runs the MNNS pipeline end to end, `make test` the test suite.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo bench lint

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,sweep]"
	@touch $(STAMP)

test: install
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m cot2cli.bench
