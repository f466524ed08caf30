"""ReasonEmbed recipe (``configs/common.py``) on Qwen3-8B: LoRA r=32/alpha=64 on all projections,
RI-InfoNCE (tau 0.02, kappa 5), AdamW 1e-4 with 10% warm-up and linear decay, bf16 compute,
per-domain batches of 1,024 passages. This file changes only the model: Qwen3-8B.

    python -m reasonembed_jax.train --config configs/reasonembed_qwen3_8b.py[:VARIANTS] \
        --workdir runs/reasonembed-qwen3_8b --config.model.hf_dir=/models/STAGE1_CHECKPOINT \
        --config.data.sources="('/data/reasonembed/*.jsonl.gz',)"

VARIANTS, comma-separated (``common.RECIPE_VARIANTS``): full, gradcache, infonce, fsdp, authors.
Until hf_dir is overridden it points at the bare config in shared/data, enough for --dry_run.
"""

import pathlib

from reasonembed_jax.training.config import load_module

common = load_module(pathlib.Path(__file__).with_name("common.py"))
VARIANTS = common.RECIPE_VARIANTS


def get_config(arg: str | None = None):
    return common.reasonembed_config("Qwen3-8B", arg)
