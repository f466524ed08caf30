"""The parameter table: every parameter's shape, logical axes, initialiser and HF name/layout.

Model construction, abstract shapes, sharding and HF conversion all read this one table, so a
parameter cannot be added to one and forgotten in another.

Layouts (ours vs HF ``nn.Linear.weight`` which is ``[out, in]``):

- ``q_proj``  ``[L, hidden, heads, head_dim]``      HF ``[heads*head_dim, hidden]``
- ``k_proj``/``v_proj`` ``[L, hidden, kv_heads, head_dim]``
- ``o_proj``  ``[L, heads, head_dim, hidden]``      HF ``[hidden, heads*head_dim]``
- ``gate_proj``/``up_proj`` ``[L, hidden, mlp]``, ``down_proj`` ``[L, mlp, hidden]``
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reasonembed_jax.model.config import DecoderConfig

LAYER_PREFIX = "layers."


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter. ``hf_name`` has a ``{layer}`` field for per-layer (stacked) parameters;
    ``from_hf``/``to_hf`` convert one layer's tensor between HF and our layout."""

    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    init: str  # "normal", "ones" or "zeros"
    hf_name: str
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    # False: loaded, sharded and exported like the rest, but never updated by training.
    trainable: bool = True

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of one HF tensor (one layer's, for stacked parameters)."""
        layer_shape = self.shape[1:] if self.stacked else self.shape
        return tuple(jax.eval_shape(self.to_hf, jax.ShapeDtypeStruct(layer_shape, np.float32)).shape)


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """HF ``[out, in]`` weight <-> our ``[*in_shape, *out_shape]`` kernel."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))

    def from_hf(w: np.ndarray) -> np.ndarray:
        return w.T.reshape(*in_shape, *out_shape)

    def to_hf(w: np.ndarray) -> np.ndarray:
        return w.reshape(n_in, n_out).T

    return from_hf, to_hf


def reshape(shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    return (lambda w: w.reshape(shape)), (lambda w: w.reshape(-1))


def param_specs(config: Any) -> dict[str, ParamSpec]:
    """The parameter table of ``config`` (either family), keyed by our dotted parameter path."""
    if config.model_type == "bert":
        from reasonembed_jax.model.bert import bert_param_specs

        return bert_param_specs(config)
    return decoder_param_specs(config)


def init_param_value(spec: ParamSpec, key: jax.Array, config: Any) -> jax.Array:
    """A freshly initialised parameter: N(0, initializer_range) matrices, ones or zeros."""
    dtype = config.jnp_param_dtype
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    return (config.initializer_range * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


def decoder_param_specs(config: DecoderConfig) -> dict[str, ParamSpec]:
    """The parameter table of a decoder (Qwen3 / Qwen2 / Llama) config."""
    c = config
    L, H, M = c.num_layers, c.hidden_size, c.intermediate_size
    N, K, D = c.num_heads, c.num_kv_heads, c.head_dim
    specs: dict[str, ParamSpec] = {
        "embed_tokens": ParamSpec(
            (c.vocab_size, H), ("vocab", "embed"), "normal", "embed_tokens.weight",
            identity, identity,
        ),
        "norm": ParamSpec((H,), ("norm",), "ones", "norm.weight", identity, identity),
    }

    def layer(name: str, shape: tuple[int, ...], axes: tuple[str, ...], init: str, hf: str,
              convert: tuple[Callable, Callable] = (identity, identity)) -> None:
        specs[LAYER_PREFIX + name] = ParamSpec(
            (L, *shape), ("layers", *axes), init, f"layers.{{layer}}.{hf}", *convert
        )

    layer("input_norm", (H,), ("norm",), "ones", "input_layernorm.weight")
    layer("post_attention_norm", (H,), ("norm",), "ones", "post_attention_layernorm.weight")
    for name, heads, axis in (("q", N, "q_heads"), ("k", K, "kv_heads"), ("v", K, "kv_heads")):
        layer(f"{name}_proj", (H, heads, D), ("embed", axis, "head_dim"), "normal",
              f"self_attn.{name}_proj.weight", linear((H,), (heads, D)))
        if c.attention_bias:
            layer(f"{name}_bias", (heads, D), (axis, "head_dim"), "zeros",
                  f"self_attn.{name}_proj.bias", reshape((heads, D)))
    layer("o_proj", (N, D, H), ("q_heads", "head_dim", "embed"), "normal",
          "self_attn.o_proj.weight", linear((N, D), (H,)))
    if c.attention_bias and c.model_type != "qwen2":
        layer("o_bias", (H,), ("norm",), "zeros", "self_attn.o_proj.bias")
    if c.qk_norm:
        layer("q_norm", (D,), ("head_dim",), "ones", "self_attn.q_norm.weight")
        layer("k_norm", (D,), ("head_dim",), "ones", "self_attn.k_norm.weight")
    layer("gate_proj", (H, M), ("embed", "mlp"), "normal", "mlp.gate_proj.weight",
          linear((H,), (M,)))
    layer("up_proj", (H, M), ("embed", "mlp"), "normal", "mlp.up_proj.weight",
          linear((H,), (M,)))
    layer("down_proj", (M, H), ("mlp", "embed"), "normal", "mlp.down_proj.weight",
          linear((M,), (H,)))
    if c.mlp_bias:
        layer("gate_bias", (M,), ("mlp",), "zeros", "mlp.gate_proj.bias")
        layer("up_bias", (M,), ("mlp",), "zeros", "mlp.up_proj.bias")
        layer("down_bias", (H,), ("norm",), "zeros", "mlp.down_proj.bias")
    return specs

