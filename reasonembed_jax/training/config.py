"""The training configuration: one ``ml_collections.ConfigDict`` with small, typed groups.

Config files in ``configs/`` call ``base_config()`` and change what their recipe needs; the
command line overrides any field (``--config.optim.learning_rate=3e-5``); an unknown key is an
error naming it (the dict is locked).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from reasonembed_jax.data.pipeline import default_data_config
from reasonembed_jax.lora import PROJECTIONS


def load_config_file(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file given as ``path[:arg]`` (the ``--config`` syntax)."""
    path, _, arg = os.fspath(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location(
        f"config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, at its default (the ReasonEmbed recipe where it has one)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.init = "hf"  # "hf": weights from hf_dir; "scratch": random init from hf_dir's config
    c.model.hf_dir = ""  # local HF folder (config.json [+ safetensors] [+ tokenizer])
    # Shrink the architecture for scratch runs (demo/tests): layers, hidden, heads, kv_heads,
    # head_dim, intermediate. Empty: the config as is.
    c.model.shrink = ml_collections.ConfigDict()
    c.model.param_dtype = "float32"  # master weights
    c.model.frozen_dtype = "bfloat16"  # the base weights under LoRA (never updated)
    c.model.dtype = "bfloat16"  # compute
    # "auto": the family's own (causal for decoders, bidirectional for BERT); or either name.
    c.model.attention = "auto"
    # How attention runs: "auto" (cuDNN's fused kernel on GPU in bf16/fp16, else "matmul"),
    # "matmul" (our batched matmuls), "xla" or "cudnn" (jax.nn.dot_product_attention's).
    c.model.attention_impl = "auto"
    c.model.scan_layers = True
    c.model.remat_policy = "full"  # none | full | dots | save_projections
    c.model.pooling = "last_token"
    # Train with the HF config's dropout rates (BERT family: hidden and attention dropout, as
    # model.train() in PyTorch). Decoders have no dropout.
    c.model.dropout = False

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.lora.dropout = 0.1
    c.lora.targets = PROJECTIONS

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "ri_infonce"  # infonce | ri_infonce | qwen3_masked
    c.loss.temperature = 0.02
    c.loss.kappa = 5.0
    c.loss.ri_warmup_steps = 100
    c.loss.qwen3_margin = 0.1
    c.loss.mask_duplicate_positives = True  # in-batch copies of a positive are not negatives

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.1
    c.optim.decay = "linear"  # linear | cosine | constant
    c.optim.end_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.num_steps = config_dict.placeholder(int)  # None: one pass as the data config says
    c.train.grad_cache = False
    c.train.grad_cache_chunk = 8  # rows per device per GradCache chunk
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.max_consecutive_nan = 5
    c.train.peak_tflops_per_device = config_dict.placeholder(float)  # for MFU; None: by device
    c.train.export_at_end = True
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps; 0: never during training
    c.eval.data = ""  # e.g. "beir:../shared/data/beir_scifact"
    c.eval.split = ""  # "": BEIR test qrels / BRIGHT examples
    c.eval.top_k = 100
    c.eval.max_length = 512
    c.eval.batch_size = 32

    c.export = ml_collections.ConfigDict()
    c.export.query_instruction = ""  # default query prompt written for sentence-transformers
    c.export.max_length = 512
    c.export.dtype = "bfloat16"

    c.data = default_data_config()
    return c
