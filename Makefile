# make demo: train a small CNN on the bundled digits, export it, inspect and evaluate it with onnxprune.
# make test: the test suite (reads the real data from ONNXPRUNE_DATA, default ../shared/data).
# Both set up .venv themselves: torch==2.13.0 (the local CPU build) first, then the package with its extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export ONNXPRUNE_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,torch]'
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf build .pytest_cache
