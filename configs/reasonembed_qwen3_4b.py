"""ReasonEmbed recipe on Qwen3-4B: LoRA r=32/alpha=64 on all projections, RI-InfoNCE (tau 0.02, kappa 5),
AdamW 1e-4 with 10% warm-up and linear decay, bf16 compute, per-domain batches of 1,024 passages.

    python -m reasonembed_jax.train --config configs/reasonembed_qwen3_4b.py[:full,gradcache,infonce,fsdp] \
        --workdir runs/reasonembed-qwen3_4b --config.model.hf_dir=/models/STAGE1_CHECKPOINT \
        --config.data.sources="('/data/reasonembed/*.jsonl.gz',)"

Until hf_dir is overridden it points at the bare config in shared/data, enough for --dry_run.
"""

from reasonembed_jax.training.recipes import reasonembed_config


def get_config(arg: str | None = None):
    return reasonembed_config("Qwen3-4B", arg)
