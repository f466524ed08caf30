"""Demo: a tiny random Qwen3 trained on the shipped BRIGHT-derived records, on CPU in 1-2 minutes.

    python -m reasonembed_jax.train --config configs/demo.py[:lora,gradcache] --workdir runs/demo

The architecture is Qwen3-0.6B's (real tokenizer, q/k norms, GQA) shrunk to 2 layers of width
64, trained from scratch with full fine-tuning and RI-InfoNCE. Variants: ``lora`` trains LoRA
adapters instead, ``gradcache`` uses GradCache. Its data block is the one demo data set: the
demo (``python -m reasonembed_jax.demo``) and ``benchmarks/data_throughput.py`` read it here.
"""

import os
import pathlib

from reasonembed_jax.data.pipeline import DEMO_DATA_DIR, default_data_config
from reasonembed_jax.training.config import base_config, load_module, parse_variants

common = load_module(pathlib.Path(__file__).with_name("common.py"))
VARIANTS = ("lora", "gradcache")


def get_config(arg: str | None = None):
    variants = parse_variants(arg, VARIANTS)
    c = base_config()
    c.model.init = "scratch"
    c.model.hf_dir = os.path.join(common.SHARED, "hf_configs", "Qwen3-0.6B")
    c.model.shrink = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, intermediate=192)
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.lora.enabled = "lora" in variants
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.loss.kind = "ri_infonce"
    c.loss.ri_warmup_steps = 10
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.1
    c.train.num_steps = None  # 4 epochs of the demo records (about 180 steps)
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.grad_cache = "gradcache" in variants
    c.train.grad_cache_chunk = 1
    c.export.query_instruction = "Given a post, retrieve relevant passages that help answer the post."
    c.export.max_length = 256
    c.export.dtype = "float32"
    # The shipped records: seven BRIGHT domains of 48 records, with reasoning queries.
    c.data = default_data_config()
    c.data.sources = (os.path.join(DEMO_DATA_DIR, "*.jsonl.gz"),)
    c.data.tokenizer = os.path.join(common.SHARED, "qwen3_tokenizer")
    c.data.use_reasoning_query = True
    c.data.num_devices = 1
    c.data.num_epochs = 4.0
    # Per-domain shapes, about 32 passages per step: (G, batch) = (4, 8) by default.
    c.data.group_size, c.data.batch_size = 4, 8
    c.data.domains = {"robotics": {"group_size": 8, "batch_size": 4},
                      "stackoverflow": {"group_size": 2, "batch_size": 16}}
    # Fixed widths: one compiled step per (G, batch) shape, three in all.
    c.data.pad_to_max_length = True
    c.data.query_max_length = 64
    c.data.passage_max_length = 128
    c.data.reasoning_max_length = 64
    return c
