"""The BERT family (BERT, MiniLM, BGE, E5) as an encoder: config, parameter table and forward.

Same contract as the decoder family (``decoder.py``): a frozen config dataclass built from an HF
``config.json``, a parameter table of ``ParamSpec`` rows with logical axes and HF names, and a
pure ``forward(config, params, ids, mask)`` returning final hidden states. Per-layer parameters are
stacked on a leading ``layers`` axis and scanned.

Architecture (HF ``BertModel``): word + absolute position + token-type embeddings, LayerNorm;
then per layer post-LayerNorm blocks ``x = LN(x + Attn(x))``, ``x = LN(x + W2 act(W1 x))``, with
biases everywhere. Numerics follow HF: LayerNorm statistics and softmax in float32.

Positions count real tokens only (``cumsum(mask) - 1``), so a left-padded row gets the positions
HF gives the same row right-padded or unpadded: the embedding of a text does not depend on its
batch. Token types are all 0 (single-segment encoding, what sentence-transformers does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from reasonembed_jax.model.config import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    RuntimeFields,
    resolve_dtype,
)
from reasonembed_jax.model.decoder import (
    AttentionMask,
    attention,
    remat_policy,
    resolve_attention_impl,
    to_right_padding,
)
from reasonembed_jax.model.dropout import dropout
from reasonembed_jax.model.params import LAYER_PREFIX, ParamSpec, identity, linear, reshape
from reasonembed_jax.model.sharding import DEFAULT_RULES, Rules, constrain

Array = jax.Array
BERT_MODEL_TYPES = ("bert",)
# HF activation names -> jax functions ("gelu" in HF is the exact erf form).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig(RuntimeFields):
    """Architecture of a BERT-style encoder plus run-time choices (dtypes, remat, dropout).

    ``hf_config`` keeps the original dict so export writes back every field we do not model.
    ``with_pooler`` says whether the checkpoint has HF's ``pooler.dense`` (unused by embedding
    pooling, carried through unchanged so the exported folder loads without new weights).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    with_pooler: bool = True
    # Run-time choices (not part of the HF architecture).
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "bidirectional"
    attention_impl: str = "auto"  # auto | matmul | xla | cudnn (see decoder.attention)
    scan_layers: bool = True
    remat_policy: str = "none"
    hf_config: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in BERT_MODEL_TYPES:
            raise ValueError(f"unsupported model_type '{self.model_type}' for the BERT family")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act '{self.hidden_act}'; supported: "
                             f"{sorted(ACTIVATIONS)}")
        if self.attention != "bidirectional":
            raise ValueError("BERT attention is bidirectional; set model.attention="
                             f"'bidirectional' (got '{self.attention}')")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                             f"'{self.attention_impl}'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got "
                             f"'{self.remat_policy}'")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        resolve_dtype(self.param_dtype)
        resolve_dtype(self.dtype)

    # The decoder family's names, so shared code (FLOP counts, LoRA) reads either config.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    mlp_matrices = 2  # up and down (no gate)
    padding_side = "right"  # what HF BertModel's default positions need (see export)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **runtime: Any) -> BertConfig:
        """Builds the config from an HF BERT ``config.json`` dict."""
        if hf.get("model_type") not in BERT_MODEL_TYPES:
            raise ValueError(f"config.json has model_type '{hf.get('model_type')}', not bert")
        kind = hf.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"position_embedding_type '{kind}' is not supported (absolute only)")
        return cls(
            model_type=hf["model_type"],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
            initializer_range=hf.get("initializer_range", 0.02),
            hf_config=dict(hf),
            **runtime,
        )

    def to_hf(self, *, torch_dtype: str | None = None) -> dict[str, Any]:
        """The HF config dict of the base model (``BertModel``) for export."""
        hf = dict(self.hf_config or {})
        hf.update(
            model_type=self.model_type, architectures=["BertModel"], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act, hidden_dropout_prob=self.hidden_dropout,
            attention_probs_dropout_prob=self.attention_dropout,
            position_embedding_type="absolute",
        )
        if torch_dtype is not None:
            hf["torch_dtype"] = torch_dtype
        return hf


def bert_param_specs(config: BertConfig) -> dict[str, ParamSpec]:
    """The parameter table of ``config``, keyed by our dotted path. Projection names match the
    decoder's (``q_proj`` ... ``o_proj``, ``up_proj``, ``down_proj``) so LoRA targets them alike."""
    c = config
    L, H, M, N, D = c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim
    specs: dict[str, ParamSpec] = {}

    def top(name: str, shape: tuple[int, ...], axes: tuple[str, ...], init: str, hf: str,
            convert: tuple = (identity, identity), trainable: bool = True) -> None:
        specs[name] = ParamSpec(shape, axes, init, hf, *convert, trainable=trainable)

    def layer(name: str, shape: tuple[int, ...], axes: tuple[str, ...], init: str, hf: str,
              convert: tuple = (identity, identity)) -> None:
        specs[LAYER_PREFIX + name] = ParamSpec(
            (L, *shape), ("layers", *axes), init, f"encoder.layer.{{layer}}.{hf}", *convert)

    top("embed_tokens", (c.vocab_size, H), ("vocab", "embed"), "normal",
        "embeddings.word_embeddings.weight")
    top("position_embeddings", (c.max_position_embeddings, H), ("positions", "embed"), "normal",
        "embeddings.position_embeddings.weight")
    top("token_type_embeddings", (c.type_vocab_size, H), ("token_types", "embed"), "normal",
        "embeddings.token_type_embeddings.weight")
    top("embed_norm", (H,), ("norm",), "ones", "embeddings.LayerNorm.weight")
    top("embed_norm_bias", (H,), ("norm",), "zeros", "embeddings.LayerNorm.bias")
    for name, hf, axis in (("q", "query", "q_heads"), ("k", "key", "kv_heads"),
                           ("v", "value", "kv_heads")):
        layer(f"{name}_proj", (H, N, D), ("embed", axis, "head_dim"), "normal",
              f"attention.self.{hf}.weight", linear((H,), (N, D)))
        layer(f"{name}_bias", (N, D), (axis, "head_dim"), "zeros", f"attention.self.{hf}.bias",
              reshape((N, D)))
    layer("o_proj", (N, D, H), ("q_heads", "head_dim", "embed"), "normal",
          "attention.output.dense.weight", linear((N, D), (H,)))
    layer("o_bias", (H,), ("norm",), "zeros", "attention.output.dense.bias")
    layer("attention_norm", (H,), ("norm",), "ones", "attention.output.LayerNorm.weight")
    layer("attention_norm_bias", (H,), ("norm",), "zeros", "attention.output.LayerNorm.bias")
    layer("up_proj", (H, M), ("embed", "mlp"), "normal", "intermediate.dense.weight",
          linear((H,), (M,)))
    layer("up_bias", (M,), ("mlp",), "zeros", "intermediate.dense.bias")
    layer("down_proj", (M, H), ("mlp", "embed"), "normal", "output.dense.weight",
          linear((M,), (H,)))
    layer("down_bias", (H,), ("norm",), "zeros", "output.dense.bias")
    layer("output_norm", (H,), ("norm",), "ones", "output.LayerNorm.weight")
    layer("output_norm_bias", (H,), ("norm",), "zeros", "output.LayerNorm.bias")
    if c.with_pooler:
        # Not part of any embedding pooling: carried through, never trained.
        top("pooler_dense", (H, H), ("embed", None), "normal", "pooler.dense.weight",
            linear((H,), (H,)), trainable=False)
        top("pooler_bias", (H,), ("norm",), "zeros", "pooler.dense.bias", trainable=False)
    return specs


def layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with the statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _dropout(x: Array, rate: float, key: Array | None, salt: int) -> Array:
    return dropout(x, rate, None if key is None else jax.random.fold_in(key, salt))


def bert_layer(
    x: Array,
    params: dict[str, Array],
    mask: AttentionMask,
    config: BertConfig,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    project: Any = None,
    dropout_key: Array | None = None,
) -> Array:
    """One post-LayerNorm BERT block on ``x [B, T, hidden]``; dropout when ``dropout_key``."""
    c = config
    p = {k: v.astype(c.jnp_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
         for k, v in params.items()}
    b, t, _ = x.shape
    q = checkpoint_name(project("q_proj", x, p, "bth,hnd->btnd") + p["q_bias"], "query_proj")
    k = checkpoint_name(project("k_proj", x, p, "bth,hnd->btnd") + p["k_bias"], "key_proj")
    v = checkpoint_name(project("v_proj", x, p, "bth,hnd->btnd") + p["v_bias"], "value_proj")
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None), mesh,
                  rules)
    k = constrain(k, ("activation_batch", "activation_length", "activation_heads", None), mesh,
                  rules)
    if c.attention_impl in ("xla", "cudnn"):  # jax.nn's kernels (no attention dropout)
        attn = attention(q, k, v, mask, False, c.attention_impl)
    else:
        # Heads-major batched matmuls: on XLA:CPU this runs ~3x faster than the equivalent
        # "btnd,bsnd->bnts" einsum (benchmarks/scifact_finetune.py's encode and step times).
        qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, N, T, D]
        logits = jnp.matmul(qh, kh.swapaxes(-1, -2), preferred_element_type=jnp.float32)
        logits = logits * (c.head_dim**-0.5)
        logits = jnp.where(mask.boolean[:, 0], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = _dropout(probs, c.attention_dropout, dropout_key, 0).astype(v.dtype)
        attn = jnp.matmul(probs, vh).transpose(0, 2, 1, 3)  # [B, T, N, D]
    out = checkpoint_name(project("o_proj", attn, p, "btnd,ndh->bth") + p["o_bias"], "out_proj")
    out = _dropout(out, c.hidden_dropout, dropout_key, 1)
    x = layer_norm(x + out, p["attention_norm"], p["attention_norm_bias"], c.layer_norm_eps)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"), mesh, rules)

    hidden = ACTIVATIONS[c.hidden_act](project("up_proj", x, p, "bth,hm->btm") + p["up_bias"])
    hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"), mesh,
                       rules)
    down = checkpoint_name(project("down_proj", hidden, p, "btm,mh->bth") + p["down_bias"],
                           "mlp_out")
    down = _dropout(down, c.hidden_dropout, dropout_key, 2)
    x = layer_norm(x + down, p["output_norm"], p["output_norm_bias"], c.layer_norm_eps)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"), mesh, rules)


def bert_forward(
    config: BertConfig,
    params: Mapping[str, Array],
    input_ids: Array,
    attention_mask: Array,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    project: Any,
    dropout_key: Array | None = None,
) -> Array:
    """Final hidden states ``[B, T, hidden]`` of a BERT encoder as a pure function of the flat
    parameter dict. ``dropout_key`` (raw key data or a key) switches HF's dropout on: the
    embedding output, attention probabilities and both residual branches, as ``model.train()``."""
    impl = resolve_attention_impl(config.attention_impl, config.dtype)
    if dropout_key is not None and config.attention_dropout > 0 and impl != "matmul":
        if config.attention_impl != "auto":
            raise ValueError(f"attention_impl='{impl}' has no attention dropout; train BERT with "
                             "dropout on attention_impl='matmul' (or 'auto')")
        impl = "matmul"
    c = config.replace(attention_impl=impl)
    if input_ids.shape[1] > c.max_position_embeddings:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's "
                         f"max_position_embeddings={c.max_position_embeddings}")
    attention_mask = attention_mask.astype(jnp.int32)
    restore = None
    if impl == "cudnn":  # the kernel reads lengths: real tokens first
        input_ids, attention_mask, restore = to_right_padding(input_ids, attention_mask)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    x = (jnp.take(params["embed_tokens"], input_ids, axis=0).astype(jnp.float32)
         + jnp.take(params["position_embeddings"], positions, axis=0).astype(jnp.float32)
         + params["token_type_embeddings"][0].astype(jnp.float32))
    x = layer_norm(x, params["embed_norm"], params["embed_norm_bias"], c.layer_norm_eps)
    x = x.astype(c.jnp_dtype)
    key = None
    if dropout_key is not None:
        key = (jax.random.wrap_key_data(dropout_key) if dropout_key.dtype == jnp.uint32
               else dropout_key)
        x = _dropout(x, c.hidden_dropout, jax.random.fold_in(key, c.num_layers), 3)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"), mesh, rules)
    mask = AttentionMask(attention_mask.astype(bool)[:, None, None, None, :],
                         attention_mask.sum(axis=1, dtype=jnp.int32))
    stacked = {k[len(LAYER_PREFIX):]: v for k, v in params.items() if k.startswith(LAYER_PREFIX)}
    layer_keys = None if key is None else jax.random.split(key, c.num_layers)

    def layer_fn(h: Array, xs: tuple[dict[str, Array], Array | None]) -> Array:
        p, k = xs
        return bert_layer(h, p, mask, c, mesh, rules, project, k)

    if c.remat_policy != "none":
        layer_fn = jax.checkpoint(layer_fn, policy=remat_policy(c.remat_policy))
    if c.scan_layers:
        x, _ = jax.lax.scan(lambda h, xs: (layer_fn(h, xs), None), x, (stacked, layer_keys))
    else:
        for i in range(c.num_layers):
            x = layer_fn(x, (jax.tree.map(lambda a, i=i: a[i], stacked),
                             None if layer_keys is None else layer_keys[i]))
    if restore is not None:
        x = jnp.take_along_axis(x, restore[:, :, None], axis=1)
    return x
