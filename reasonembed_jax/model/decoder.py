"""The decoder backbone (Qwen3 / Qwen2 / Llama-3.x) as pure functions over its parameter table,
used as an encoder (``decoder_forward``).

Per-layer parameters are stacked on a leading ``layers`` axis and the layer function is run with
``jax.lax.scan`` (one compiled layer for 36 layers) or an unrolled loop. Every parameter and the
main activations carry logical axis names (see ``sharding.py``).

Numerics follow HF transformers: RMSNorm in float32 then cast back, softmax in float32, rotary
embeddings computed in float32. Positions count only real tokens (``cumsum(mask) - 1``), so an
embedding does not depend on how much left padding its batch needed (RoPE is shift-invariant, so
this matches HF's default positions up to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from reasonembed_jax.model.config import ATTENTION_IMPLS, DecoderConfig
from reasonembed_jax.model.params import LAYER_PREFIX
from reasonembed_jax.model.pooling import last_token_index
from reasonembed_jax.model.sharding import DEFAULT_RULES, Rules, constrain

Array = jax.Array
# A hook that may replace a projection (LoRA adds its low-rank update here).
ProjectFn = Callable[[str, Array, dict[str, Array], str], Array]


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """``weight * (x / sqrt(mean(x^2) + eps))`` with the statistics in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(config: DecoderConfig) -> Array:
    """``theta^(-2i/d)``, rescaled by the Llama-3 rule when ``rope_scaling.rope_type == llama3``:
    wavelengths longer than ``original_max/low_freq_factor`` are divided by ``factor``, shorter
    than ``original_max/high_freq_factor`` kept, and those in between interpolated smoothly."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv
        smooth = (original / wavelength - low) / (high - low)
        interpolated = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where(
            wavelength > original / low,
            inv / factor,
            jnp.where(wavelength < original / high, inv, interpolated),
        )
    return inv


def rotary_tables(positions: Array, config: DecoderConfig) -> tuple[Array, Array]:
    """cos/sin tables ``[B, T, head_dim]`` (float32) for integer ``positions [B, T]``."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(config)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, T, heads, d]`` by the half-split convention: ``x*cos + rot(x)*sin`` with
    ``rot([a, b]) = [-b, a]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask_bias(attention_mask: Array, causal: bool) -> Array:
    """Boolean ``[B, 1, 1, T, T]`` (query, key) mask: keys must be real tokens, and for causal
    attention not after the query. Fully masked rows (padding queries) get a uniform softmax
    instead of NaN because masked logits use a large finite negative."""
    keys = attention_mask.astype(bool)[:, None, None, None, :]
    if not causal:
        return keys
    t = attention_mask.shape[1]
    lower = jnp.tril(jnp.ones((t, t), dtype=bool))
    return keys & lower[None, None, None, :, :]


class AttentionMask(NamedTuple):
    """Both forms of a batch's attention mask: ``boolean [B, 1, 1, T, S]`` (``matmul``/``xla``)
    and the real-token count per row ``lengths [B]`` (``cudnn``, right padding only)."""

    boolean: Array
    lengths: Array


def resolve_attention_impl(impl: str, dtype: Any) -> str:
    """``auto``: cuDNN's fused kernel on GPU for 16-bit compute, else our own ``matmul`` path
    (heads-major batched matmuls: on XLA:CPU as fast as or faster than ``jax.nn``'s ``xla``)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got '{impl}'")
    if impl != "auto":
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else "matmul"


def attention(q: Array, k: Array, v: Array, mask: AttentionMask, causal: bool, impl: str,
              *, single_query: bool = False) -> Array:
    """Scaled dot-product attention ``[B, T, heads, d]`` of ``q [B, T, heads, d]`` over
    ``k, v [B, S, kv_heads, d]`` (grouped-query when ``kv_heads < heads``).

    ``impl``: ``matmul`` (our heads-major batched matmuls, float32 softmax), ``xla`` or
    ``cudnn`` (``jax.nn.dot_product_attention`` with that implementation). ``cudnn`` reads only
    sequence lengths, so it needs right padding (``decoder_forward`` reorders a left-padded batch
    for it); the others read the boolean mask and take either side. ``single_query``: ``q`` is
    each row's last real token only (``T = 1``), which sees every real key.
    """
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    if impl in ("xla", "cudnn"):
        if impl == "cudnn":
            lengths = mask.lengths
            q_lengths = jnp.ones_like(lengths) if single_query else lengths
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=causal and not single_query, query_seq_lengths=q_lengths,
                key_value_seq_lengths=lengths, implementation="cudnn")
        return jax.nn.dot_product_attention(q, k, v, mask=mask.boolean[:, :, 0],
                                            implementation="xla")
    group = heads // kv_heads
    # [B, kv_heads, group, T, d] x [B, kv_heads, 1, d, S]: one batched matmul per (row, head).
    qh = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4)
    kh = k.transpose(0, 2, 3, 1)[:, :, None]
    vh = v.transpose(0, 2, 1, 3)[:, :, None]
    logits = jnp.matmul(qh, kh, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(mask.boolean, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    attn = jnp.matmul(probs, vh)  # [B, kv_heads, group, T, d]
    return attn.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


def split_equation(equation: str) -> tuple[str, str, str, str, str]:
    """``"bth,hnd->btnd"`` -> (x, kernel, out, contracted "h", kernel outputs "nd")."""
    lhs, out = equation.split("->")
    x, kernel = lhs.split(",")
    contracted = "".join(c for c in kernel if c in x)
    produced = "".join(c for c in kernel if c not in x)
    return x, kernel, out, contracted, produced


def project_matmul(equation: str, x: Array, w: Array) -> Array:
    """``jnp.einsum(equation, x, w)`` for a projection whose contracted axes end ``x`` and begin
    ``w`` (every ``EQUATIONS`` entry), computed as one 2-D matmul ``[tokens, in] @ [in, out]``.

    Same product; the gradient differs in how XLA:CPU runs it: from the einsum's dot_general
    its backward transposed the incoming gradient into a copy before the weight-gradient product
    (a full SmolLM2 fine-tuning step: 16.9 s as einsums, 14.9 s in this form; README, "Speed
    against PyTorch"). Other equations fall back to the einsum.
    """
    xs, ws, out, contracted, produced = split_equation(equation)
    n = len(contracted)
    if not (n and xs.endswith(contracted) and ws.startswith(contracted)
            and out == xs[:len(xs) - n] + produced):
        return jnp.einsum(equation, x, w)
    k = math.prod(w.shape[:n])
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(x.shape[:x.ndim - n] + w.shape[n:])


def default_project(name: str, x: Array, params: dict[str, Array], equation: str) -> Array:
    return project_matmul(equation, x, params[name])


def decoder_layer(
    x: Array,
    params: dict[str, Array],
    cos: Array,
    sin: Array,
    mask: AttentionMask,
    config: DecoderConfig,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    project: ProjectFn = default_project,
    query_index: Array | None = None,
) -> Array:
    """One pre-norm decoder block on ``x [B, T, hidden]`` with one layer's parameters.

    With ``query_index [B]`` only that position of each row is computed (its query, attention
    over all keys, output projection and MLP): keys and values still cover every position, so the
    result equals row ``query_index`` of the full block, at ~1/T of the query-side cost. Returns
    ``[B, 1, hidden]`` then.
    """
    c = config
    p = {k: v.astype(c.jnp_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
         for k, v in params.items()}
    b, _, _ = x.shape

    h = rms_norm(x, p["input_norm"], c.rms_norm_eps)
    h_q, cos_q, sin_q = h, cos, sin
    if query_index is not None:
        take = lambda a: jnp.take_along_axis(  # noqa: E731
            a, query_index.reshape((b, 1) + (1,) * (a.ndim - 2)), axis=1)
        x, h_q, cos_q, sin_q = take(x), take(h), take(cos), take(sin)
        if mask.boolean.shape[3] > 1:  # causal [B, 1, 1, T, T]; bidirectional: one row
            mask = mask._replace(boolean=jnp.take_along_axis(
                mask.boolean, query_index[:, None, None, None, None], axis=3))
    q = checkpoint_name(project("q_proj", h_q, p, "bth,hnd->btnd"), "query_proj")
    k = checkpoint_name(project("k_proj", h, p, "bth,hnd->btnd"), "key_proj")
    v = checkpoint_name(project("v_proj", h, p, "bth,hnd->btnd"), "value_proj")
    if c.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if c.qk_norm:
        q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], c.rms_norm_eps)
    q = constrain(apply_rotary(q, cos_q, sin_q),
                  ("activation_batch", "activation_length", "activation_heads", None), mesh, rules)
    k = constrain(apply_rotary(k, cos, sin),
                  ("activation_batch", "activation_length", "activation_kv_heads", None), mesh,
                  rules)

    attn = attention(q, k, v, mask, c.attention == "causal", c.attention_impl,
                     single_query=query_index is not None)
    out = checkpoint_name(project("o_proj", attn, p, "btnd,ndh->bth"), "out_proj")
    if "o_bias" in p:
        out = out + p["o_bias"]
    x = x + out
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"), mesh, rules)

    h = rms_norm(x, p["post_attention_norm"], c.rms_norm_eps)
    gate = project("gate_proj", h, p, "bth,hm->btm")
    up = project("up_proj", h, p, "bth,hm->btm")
    if c.mlp_bias:
        gate, up = gate + p["gate_bias"], up + p["up_bias"]
    hidden = constrain(jax.nn.silu(gate) * up,
                       ("activation_batch", "activation_length", "activation_mlp"), mesh, rules)
    down = checkpoint_name(project("down_proj", hidden, p, "btm,mh->bth"), "mlp_out")
    if c.mlp_bias:
        down = down + p["down_bias"]
    x = x + down
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"), mesh, rules)


def remat_policy(name: str) -> Any:
    """Named rematerialisation policies: ``none`` (keep everything), ``full`` (recompute
    everything), ``dots`` (save matmuls without batch dims), ``save_projections`` (save the
    q/k/v/o and MLP output projections by checkpoint name)."""
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_projections": jax.checkpoint_policies.save_only_these_names(
            "query_proj", "key_proj", "value_proj", "out_proj", "mlp_out"
        ),
    }
    if name == "none":
        return None
    if name not in policies:
        raise ValueError(f"unknown remat policy '{name}'; choose none or one of {sorted(policies)}")
    return policies[name]


def _scan_layers(x: Array, stacked: dict[str, Array], layer_fn: Callable, index: Array | None
                 ) -> Array:
    """Runs the stacked layers with one ``lax.scan`` over the *whole* stacks, each scanned
    slice used as it is, so autodiff forwards it as a residual instead of stacking a copy.

    Parameter-sized temporaries found in XLA's buffer assignment: scanning a sliced stack
    (``a[:L-1]``, for the last-token shortcut) copied every stacked weight, and running the
    shortcut under ``lax.cond`` inside the scan made the weights cond outputs, which autodiff then
    stacked as residuals. So under scan the last layer runs in full (``index`` only picks the
    pooled row; ~1/L more compute); the unrolled path keeps the shortcut.
    """
    def body(h: Array, p: dict[str, Array]) -> tuple[Array, None]:
        return layer_fn(h, p), None

    x, _ = jax.lax.scan(body, x, stacked)
    if index is None:
        return x
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


def decoder_forward(
    config: DecoderConfig,
    params: Mapping[str, Array],
    input_ids: Array,
    attention_mask: Array,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    project: ProjectFn = default_project,
    last_token_only: bool = False,
) -> Array:
    """Final hidden states ``[B, T, hidden]`` (after the final norm) as a pure function of the
    flat parameter dict ``{"embed_tokens", "norm", "layers.<name>": [L, ...]}``.

    Extra ``layers.*`` entries (LoRA factors, per-layer dropout keys) are passed through to
    ``project`` inside each layer, sliced to that layer.

    ``last_token_only=True`` returns ``[B, hidden]``: the final hidden state of each row's last
    real token only (what last-token pooling reads). Nothing after the last layer's keys and
    values depends on other positions, so with unrolled layers the last layer runs its query side
    for that one position (``decoder_layer(query_index=...)``), saving ~1/L of the forward and
    backward; scanned layers run it in full and pick the row (see ``_scan_layers``).
    """
    c = config.replace(attention_impl=resolve_attention_impl(config.attention_impl, config.dtype))
    attention_mask = attention_mask.astype(jnp.int32)
    restore = None
    if c.attention_impl == "cudnn":  # the kernel reads lengths: move real tokens to the front
        input_ids, attention_mask, restore = to_right_padding(input_ids, attention_mask)
    x = jnp.take(params["embed_tokens"], input_ids, axis=0).astype(c.jnp_dtype)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"), mesh, rules)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    cos, sin = rotary_tables(positions, c)
    mask = AttentionMask(attention_mask_bias(attention_mask, causal=c.attention == "causal"),
                         attention_mask.sum(axis=1, dtype=jnp.int32))
    stacked = {k[len(LAYER_PREFIX):]: v for k, v in params.items() if k.startswith(LAYER_PREFIX)}

    def layer_fn(h: Array, p: dict[str, Array]) -> Array:
        return decoder_layer(h, p, cos, sin, mask, c, mesh, rules, project)

    def last_layer_fn(h: Array, p: dict[str, Array], index: Array) -> Array:
        return decoder_layer(h, p, cos, sin, mask, c, mesh, rules, project, query_index=index)

    if c.remat_policy != "none":
        layer_fn = jax.checkpoint(layer_fn, policy=remat_policy(c.remat_policy))
        last_layer_fn = jax.checkpoint(last_layer_fn, policy=remat_policy(c.remat_policy))
    if c.scan_layers:
        x = _scan_layers(x, stacked, layer_fn,
                         last_token_index(attention_mask) if last_token_only else None)
    else:
        full_layers = c.num_layers - 1 if last_token_only else c.num_layers
        for i in range(full_layers):
            x = layer_fn(x, jax.tree.map(lambda a, i=i: a[i], stacked))
        if last_token_only:
            index = last_token_index(attention_mask)
            x = last_layer_fn(x, jax.tree.map(lambda a: a[full_layers], stacked), index)[:, 0]
    if restore is not None and not last_token_only:
        x = jnp.take_along_axis(x, restore[:, :, None], axis=1)
    return rms_norm(x, params["norm"], c.rms_norm_eps)


def to_right_padding(input_ids: Array, attention_mask: Array) -> tuple[Array, Array, Array]:
    """Moves each row's real tokens to the front, in order: ``(ids, mask, restore)`` where
    ``take_along_axis(h, restore)`` puts per-position outputs back in the input's layout.
    Positions and the causal order among real tokens are unchanged, so real-token outputs are
    the same; this is what a kernel reading sequence lengths (cuDNN) needs."""
    order = jnp.argsort(1 - attention_mask, axis=1, stable=True)
    restore = jnp.argsort(order, axis=1)
    return (jnp.take_along_axis(input_ids, order, axis=1),
            jnp.take_along_axis(attention_mask, order, axis=1), restore)
