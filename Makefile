# Set-up and entry points. Each target builds its own virtual environment (.venv) on first use,
# so a fresh machine with Python 3.11 and pip needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared/data
DEMO_DIR ?= runs/demo

.PHONY: demo test lint clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch only for the HF reference in tests/benchmarks; pinned so pip takes the CPU wheel.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m reasonembed_jax.demo --workdir $(DEMO_DIR) --shared $(SHARED)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
