"""The encoder model: configuration, parameter table, NNX decoder, pooling and sharding rules."""

from reasonembed_jax.model.config import DecoderConfig
from reasonembed_jax.model.decoder import DecoderEncoder
from reasonembed_jax.model.params import ParamSpec, param_specs
from reasonembed_jax.model.pooling import pool
from reasonembed_jax.model.sharding import DEFAULT_RULES, make_mesh

__all__ = [
    "DEFAULT_RULES",
    "DecoderConfig",
    "DecoderEncoder",
    "ParamSpec",
    "make_mesh",
    "param_specs",
    "pool",
]
