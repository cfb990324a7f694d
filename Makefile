# The commands of the README: `make demo`, `make test` (the whole suite, CI) and `make check` (the fast loop).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check install lint clean

$(STAMP): pyproject.toml constraints/test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/test.txt -e '.[dev,simulation]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

# Lint + the unit tests: no real processes (-m process), no long in-process jobs (-m slow). Under 2 minutes on 2 cores.
check: $(STAMP) lint
	$(PY) -m pytest -q -m "not process and not slow"

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) demo-out
