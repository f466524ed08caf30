"""The encoder model of both families (decoder LLMs and BERT): configurations, parameter tables,
the forward and embedding functions, pooling and sharding rules."""

from reasonembed_jax.model.bert import BertConfig
from reasonembed_jax.model.config import DecoderConfig
from reasonembed_jax.model.encoder import (
    Encoder,
    ModelConfig,
    config_from_hf,
    config_from_hf_dir,
    embed,
    forward,
    init_params,
)
from reasonembed_jax.model.params import ParamSpec, param_specs
from reasonembed_jax.model.pooling import pool
from reasonembed_jax.model.sharding import DEFAULT_RULES, make_mesh

__all__ = [
    "DEFAULT_RULES",
    "BertConfig",
    "DecoderConfig",
    "Encoder",
    "ModelConfig",
    "config_from_hf",
    "config_from_hf_dir",
    "embed",
    "forward",
    "init_params",
    "ParamSpec",
    "make_mesh",
    "param_specs",
    "pool",
]
