# make demo: train a small CNN on the bundled digits, export it, inspect and evaluate it with onnxprune.
# make test: the test suite (reads the real data from ONNXPRUNE_DATA, default ../shared/data).
# Both set up .venv themselves: torch==2.13.0 (the local CPU build) first, then the package with its extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export ONNXPRUNE_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test fuzz example clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,torch,report]'
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q

# Nightly-style: the random-graph pipeline tests with many more examples (CI runs 200), shrinking failures.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	ONNXPRUNE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) ONNXPRUNE_FUZZ_SHRINK=1 ONNXPRUNE_FUZZ_RANDOM=1 $(PY) -m pytest -q -s tests/test_fuzz.py

# Fashion-MNIST end to end (README): train, remove half the FLOPs as channels, recover with finetune.
FASHION := build/fashion
example: setup
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y dataset-fashion-mnist
	$(PY) -m models.fashion -o $(FASHION)
	$(VENV)/bin/onnxprune allocate $(FASHION)/cnn.onnx --method uniform --granularity channel --budget flops \
	    --target-sparsity 0.5 --round-to 8 -o $(FASHION)/plan.json
	$(VENV)/bin/onnxprune apply $(FASHION)/cnn.onnx $(FASHION)/plan.json -o $(FASHION)/pruned.onnx --force
	$(VENV)/bin/onnxprune eval $(FASHION)/pruned.onnx --data $(FASHION)/test.npz
	$(VENV)/bin/onnxprune finetune $(FASHION)/pruned.onnx --data $(FASHION)/train.npz --teacher $(FASHION)/cnn.onnx \
	    --epochs 2 --eval-data $(FASHION)/test.npz -o $(FASHION)/tuned.onnx --force
	$(VENV)/bin/onnxprune eval $(FASHION)/tuned.onnx --data $(FASHION)/test.npz

clean:
	rm -rf build .pytest_cache
