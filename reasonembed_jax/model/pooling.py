"""Pooling of final hidden states into one vector per sequence, L2 normalisation, Matryoshka."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reasonembed_jax.model.config import POOLING_MODES

Array = jax.Array


def last_token_index(attention_mask: Array) -> Array:
    """Index of the last real token per row; correct for left and right padding alike."""
    t = attention_mask.shape[1]
    return t - 1 - jnp.argmax(jnp.flip(attention_mask.astype(jnp.int32), axis=1), axis=1)


def last_token_pool(hidden: Array, attention_mask: Array) -> Array:
    """``hidden[i, last real token of row i]`` -> ``[B, D]``."""
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def first_token_pool(hidden: Array, attention_mask: Array) -> Array:
    """``hidden[i, first real token of row i]`` -> ``[B, D]`` (CLS-style)."""
    idx = jnp.argmax(attention_mask.astype(jnp.int32), axis=1)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
    """``sum_t m_t h_t / max(sum_t m_t, 1)`` in float32."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` row-wise, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def finish_pooled(pooled: Array, *, normalize: bool = True, dim: int | None = None) -> Array:
    """float32, then Matryoshka truncation to the first ``dim`` features, then L2 normalisation
    if ``normalize`` (the tail of ``pool``, for vectors pooled elsewhere, e.g. by
    ``forward(..., last_token_only=True)``)."""
    out = pooled.astype(jnp.float32)
    if dim is not None:
        if not 0 < dim <= out.shape[-1]:
            raise ValueError(f"Matryoshka dim must be in [1, {out.shape[-1]}], got {dim}")
        out = out[..., :dim]
    return l2_normalize(out) if normalize else out


def pool(
    hidden: Array,
    attention_mask: Array,
    mode: str = "last_token",
    *,
    normalize: bool = True,
    dim: int | None = None,
) -> Array:
    """Pools ``hidden [B, T, D]`` to ``[B, dim or D]`` float32: pooling ``mode``, then Matryoshka
    truncation to the first ``dim`` features, then L2 normalisation if ``normalize``."""
    if mode == "last_token":
        out = last_token_pool(hidden, attention_mask)
    elif mode == "mean":
        out = mean_pool(hidden, attention_mask)
    elif mode == "first_token":
        out = first_token_pool(hidden, attention_mask)
    else:
        raise ValueError(f"unknown pooling mode '{mode}'; choose one of {POOLING_MODES}")
    return finish_pooled(out, normalize=normalize, dim=dim)
