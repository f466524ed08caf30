"""What the config files share: the shared-data folder and the ReasonEmbed recipe (method.md
section 4), its per-domain shapes, variants and the authors' settings. Not a config file itself.

Config files load it by path next to themselves (``configs/`` is no package)::

    common = load_module(pathlib.Path(__file__).with_name("common.py"))

and so do tests and benchmarks (``load_module(REPO / "configs" / "common.py")``).
"""

from __future__ import annotations

import os

import ml_collections

from reasonembed_jax.training.config import base_config, parse_variants

SHARED = os.environ.get("REASONEMBED_SHARED_DATA", "../shared/data")

# The recipe's (group size G, per-device batch) per BRIGHT domain: (16, 8) for StackExchange-style
# and math domains, (2, 64) for leetcode, (64, 2) for pony. The recipe configs put it in
# data.domains; a folder in the authors' released layout must name one of these domains per file.
RECIPE_DOMAIN_SHAPES = {
    "biology": (16, 8),
    "earth_science": (16, 8),
    "economics": (16, 8),
    "psychology": (16, 8),
    "robotics": (16, 8),
    "stackoverflow": (16, 8),
    "sustainable_living": (16, 8),
    "aops": (16, 8),
    "theoremqa_questions": (16, 8),
    "theoremqa_theorems": (16, 8),
    "leetcode": (2, 64),
    "pony": (64, 2),
}

# full: full fine-tuning instead of LoRA; gradcache: GradCache with 8-row chunks; infonce: basic
# InfoNCE instead of RI-InfoNCE; fsdp: parameters and optimizer state sharded over all devices;
# authors: every setting as the authors' released run had it (AUTHORS_SETTINGS).
RECIPE_VARIANTS = ("full", "gradcache", "infonce", "fsdp", "authors")


def reasonembed_config(model_folder: str, arg: str | None) -> ml_collections.ConfigDict:
    """ReasonEmbed on ``model_folder`` (a name under shared/data/hf_configs, used until
    ``--config.model.hf_dir`` names the stage-1 checkpoint to start from); ``arg``: a
    comma-separated list of ``RECIPE_VARIANTS``."""
    variants = parse_variants(arg, RECIPE_VARIANTS)
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
        c.mesh.rules = "fsdp"  # parameters sharded over the data axis (model.sharding.FSDP_RULES)
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
        "the released folder of {domain}-formatted.jsonl files (each file's domain from its "
        "name, its shape from data.domains); ours names record files"),
}
