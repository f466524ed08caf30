"""The ReasonEmbed recipe (method.md section 4) as a config builder shared by the recipe files."""

from __future__ import annotations

import os

import ml_collections

from reasonembed_jax.data.pipeline import RECIPE_DOMAIN_SHAPES
from reasonembed_jax.training.config import base_config

SHARED = os.environ.get("REASONEMBED_SHARED_DATA", "../shared/data")


def reasonembed_config(model_folder: str, arg: str | None) -> ml_collections.ConfigDict:
    """ReasonEmbed on ``model_folder`` (a name under shared/data/hf_configs, used until
    ``--config.model.hf_dir`` names the stage-1 checkpoint to start from).

    ``arg`` is a comma-separated list of variants: ``full`` (full fine-tuning instead of LoRA),
    ``gradcache`` (GradCache with 8-row chunks), ``infonce`` (basic InfoNCE instead of
    RI-InfoNCE), ``fsdp`` (shard parameters and optimizer state over all devices).
    """
    variants = set(filter(None, (arg or "").split(",")))
    unknown = variants - {"full", "gradcache", "infonce", "fsdp"}
    if unknown:
        raise ValueError(f"unknown recipe variants {sorted(unknown)}")
    c = base_config()
    c.model.init = "hf"
    c.model.hf_dir = os.path.join(SHARED, "hf_configs", model_folder)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"  # gradient checkpointing
    c.lora.enabled = "full" not in variants
    c.lora.rank, c.lora.alpha, c.lora.dropout = 32, 64.0, 0.1
    c.loss.kind = "infonce" if "infonce" in variants else "ri_infonce"
    c.loss.temperature = 0.02
    c.loss.kappa = 5.0
    c.loss.ri_warmup_steps = 100
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.1
    c.optim.decay = "linear"
    c.train.grad_cache = "gradcache" in variants
    c.train.grad_cache_chunk = 8
    c.train.checkpoint_every = 500
    if "fsdp" in variants:
        c.mesh.data, c.mesh.fsdp = 1, -1
    c.data.sources = ("/data/reasonembed/*.jsonl.gz",)
    c.data.tokenizer = c.model.hf_dir
    c.data.domains = {name: {"group_size": g, "batch_size": b}
                      for name, (g, b) in RECIPE_DOMAIN_SHAPES.items()}
    c.data.num_devices = 8  # the recipe's global batches: 1,024 passages per step
    c.data.query_max_length = c.data.passage_max_length = c.data.reasoning_max_length = 512
    c.data.append_eos = False  # what ReasonEmbed effectively did (see method.md section 1)
    c.data.use_reasoning_query = c.loss.kind == "ri_infonce"
    c.data.num_epochs = 1.0
    c.export.max_length = 8192
    c.export.query_instruction = ""
    return c
