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
    RI-InfoNCE), ``fsdp`` (shard parameters and optimizer state over all devices), ``authors``
    (every setting as the authors' released run had it: ``AUTHORS_SETTINGS``).
    """
    variants = set(filter(None, (arg or "").split(",")))
    unknown = variants - {"full", "gradcache", "infonce", "fsdp", "authors"}
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
    if "authors" in variants:
        for path, (value, _) in AUTHORS_SETTINGS.items():
            group, key = path.split(".")
            c[group][key] = value
    return c


# The authors' released run (ReasonEmbed/training/train.sh on FlagEmbedding, torchrun over 8 GPUs,
# DeepSpeed ZeRO-1 with FlagEmbedding's ds_stage1.json) where it differs from our recipe:
# {config field: (their value, why ours differs)}. Everything else is already equal.
AUTHORS_SETTINGS = {
    "optim.reference_world_size": (
        8, "their loss back-propagates through each of the 8 ranks' own embeddings and DDP "
        "averages, so clip 1.0 (and eps 1e-8) act on 1/8 of the global-mean gradient; ours clips "
        "the true global-mean gradient at 1.0, independent of the device count"),
    "optim.schedule": (
        "deepspeed", "ds_stage1.json uses DeepSpeed's WarmupDecayLR; ours warms up linearly "
        "(the paper's stated 10% warm-up then linear decay) and does not spend the first two "
        "updates at lr 0"),
    "optim.warmup_type": ("log", "DeepSpeed's default warm-up shape (used by 'deepspeed' only)"),
    "lora.init_a": ("kaiming_uniform", "PEFT's default; the same in our recipe"),
    "loss.mask_duplicate_positives": (
        False, "FlagEmbedding has no such mask: an in-batch copy of a query's own positive counts "
        "as a negative; ours leaves it out of the softmax (a false negative otherwise)"),
    "loss.reasoning_dropout": (
        True, "their no-grad reasoning-query pass runs under model.train(), so LoRA dropout is on; "
        "ours encodes the reasoning queries deterministically, which makes the RI weights "
        "a function of the parameters only"),
    "data.sources": (
        ("/data/reason-embed-data/reason-embed-data-0928",),
        "the released folder of {domain}-formatted.jsonl files (domain and shapes from the file "
        "names); ours names record files"),
}


def config_differences(ours: ml_collections.ConfigDict, other: ml_collections.ConfigDict
                       ) -> list[tuple[str, object, object]]:
    """``(dotted field, ours, other)`` for every leaf that differs, in field order."""
    def leaves(c: object, prefix: str = "") -> dict[str, object]:
        if isinstance(c, ml_collections.ConfigDict):
            out = {}
            for k in c.keys():
                out.update(leaves(c[k], f"{prefix}{k}."))
            return out
        if isinstance(c, dict):
            return {prefix[:-1]: {k: dict(v) if isinstance(v, dict) else v for k, v in c.items()}}
        return {prefix[:-1]: c}

    a, b = leaves(ours), leaves(other)
    return [(k, a.get(k), b.get(k)) for k in list(a) + [k for k in b if k not in a]
            if a.get(k) != b.get(k)]
