"""The encoder model of both families (decoder LLMs and BERT): configurations, parameter tables,
the NNX module, pooling and sharding rules."""

from reasonembed_jax.model.bert import BertConfig
from reasonembed_jax.model.config import DecoderConfig
from reasonembed_jax.model.encoder import (
    DecoderEncoder,
    Encoder,
    ModelConfig,
    config_from_hf,
    config_from_hf_dir,
    forward,
)
from reasonembed_jax.model.params import ParamSpec, param_specs
from reasonembed_jax.model.pooling import pool
from reasonembed_jax.model.sharding import DEFAULT_RULES, make_mesh

__all__ = [
    "DEFAULT_RULES",
    "BertConfig",
    "DecoderConfig",
    "DecoderEncoder",
    "Encoder",
    "ModelConfig",
    "config_from_hf",
    "config_from_hf_dir",
    "forward",
    "ParamSpec",
    "make_mesh",
    "param_specs",
    "pool",
]
