"""Contrastive losses over the global batch (method.md sections 2-3).

Shapes: ``q [B, D]`` queries, ``p [B*G, D]`` passages grouped per query (positive first, then its
G-1 hard negatives), ``rq [B, D]`` reasoning queries. Scores are cosine similarities divided by
the temperature ``tau``: ``s_ij = cos(q_i, p_j) / tau``.

Every function is written on whole (global) arrays. Under ``jax.jit`` with the batch sharded over
devices, ``q @ p.T`` makes the compiler gather the passages, so every query's softmax runs over
all B*G passages of all devices, and the mean over the global batch gives the true gradient
scale with no world-size correction.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _normalize(x: Array) -> Array:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 -> f32; f64 stays f64
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check(q: Array, p: Array, group_size: int) -> int:
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"expected q [B, D] and p [B*G, D], got {q.shape} and {p.shape}")
    if group_size < 1 or p.shape[0] != q.shape[0] * group_size:
        raise ValueError(
            f"p has {p.shape[0]} rows but B*G = {q.shape[0]}*{group_size} = "
            f"{q.shape[0] * group_size}"
        )
    return q.shape[0]


def positive_columns(batch: int, group_size: int) -> Array:
    """Column of query i's positive among the B*G passages: ``i * G``."""
    return jnp.arange(batch) * group_size


def duplicate_positive_mask(passage_keys: Array | None, batch: int, group_size: int) -> Array | None:
    """``[B, B*G]`` True where passage j is another copy of query i's positive (same key, other
    column): such a copy is not a negative, so it leaves the softmax."""
    if passage_keys is None:
        return None
    cols = positive_columns(batch, group_size)
    same = passage_keys[None, :] == passage_keys[cols][:, None]
    return same & (jnp.arange(passage_keys.shape[0])[None, :] != cols[:, None])


def per_query_infonce(
    q: Array, p: Array, *, group_size: int, temperature: float = 0.02,
    passage_keys: Array | None = None,
) -> Array:
    """``L_i = logsumexp_j s_ij - s_{i, iG}`` over all B*G passages -> ``[B]``; with
    ``passage_keys`` the other in-batch copies of query i's positive are left out of the sum."""
    batch = _check(q, p, group_size)
    scores = _normalize(q) @ _normalize(p).T / temperature
    positives = jnp.take_along_axis(scores, positive_columns(batch, group_size)[:, None], axis=1)
    duplicates = duplicate_positive_mask(passage_keys, batch, group_size)
    if duplicates is not None:
        scores = jnp.where(duplicates, -jnp.inf, scores)
    return jax.nn.logsumexp(scores, axis=1) - positives[:, 0]


def in_batch_accuracy(q: Array, p: Array, *, group_size: int,
                      passage_keys: Array | None = None) -> Array:
    """Fraction of queries whose highest-scoring passage (of all B*G, copies of their own
    positive excluded) is their positive."""
    batch = _check(q, p, group_size)
    scores = _normalize(q) @ _normalize(p).T
    duplicates = duplicate_positive_mask(passage_keys, batch, group_size)
    if duplicates is not None:
        scores = jnp.where(duplicates, -jnp.inf, scores)
    return jnp.mean(jnp.argmax(scores, axis=1) == positive_columns(batch, group_size))


def weighted_infonce_loss(
    q: Array, p: Array, weights: Array, *, group_size: int, temperature: float = 0.02,
    passage_keys: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``sum_i w_i L_i / sum_i w_i`` with per-sample weights (no gradient through them)."""
    losses = per_query_infonce(q, p, group_size=group_size, temperature=temperature,
                               passage_keys=passage_keys)
    w = jax.lax.stop_gradient(weights.astype(losses.dtype))
    w = w / jnp.sum(w)
    return jnp.sum(w * losses), {"per_query_loss": losses, "weights": w}


def infonce_loss(
    q: Array, p: Array, *, group_size: int, temperature: float = 0.02,
    passage_keys: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Mean InfoNCE over the global batch: ``(1/B) sum_i L_i``.

    Returns ``(loss, aux)`` with ``aux["per_query_loss"] [B]`` and ``aux["weights"]`` (all 1/B).
    ``passage_keys [B*G]`` (text identities) removes in-batch copies of each positive.
    """
    losses = per_query_infonce(q, p, group_size=group_size, temperature=temperature,
                               passage_keys=passage_keys)
    weights = jnp.full(losses.shape, 1.0 / losses.shape[0], losses.dtype)
    return jnp.mean(losses), {"per_query_loss": losses, "weights": weights}


def reasoning_intensity_weights(
    losses: Array, reasoning_losses: Array, *, kappa: float = 5.0, eps: float = 1e-6
) -> tuple[Array, Array]:
    """Redapter weights: ``RI_i = L_i / (L'_i + eps)``, ``w_i = clip(RI_i, 0, kappa)``, normalised
    to sum to 1 over the global batch. When every clipped weight is 0 (every query of the batch
    solved: all ``L_i = 0``) the normalisation would be 0/0; the weights are then uniform (1/B),
    which ``ri_weights_degenerate`` reports. Constants: no gradient flows through them.
    Returns ``(weights, ri)``."""
    ri = jax.lax.stop_gradient(losses) / (jax.lax.stop_gradient(reasoning_losses) + eps)
    w = jnp.clip(ri, 0.0, kappa)
    total = jnp.sum(w)
    uniform = jnp.full(w.shape, 1.0 / w.shape[0], w.dtype)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), uniform), ri


def ri_weights_degenerate(ri: Array, *, kappa: float = 5.0) -> Array:
    """1.0 when the clipped RI weights of the batch sum to 0 (uniform weights used), else 0.0."""
    return (jnp.sum(jnp.clip(ri, 0.0, kappa)) <= 0).astype(jnp.float32)


def ri_infonce_loss(
    q: Array,
    p: Array,
    rq: Array,
    *,
    group_size: int,
    temperature: float = 0.02,
    kappa: float = 5.0,
    use_weights: bool | Array = True,
    passage_keys: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """RI-InfoNCE (Redapter): ``sum_i w_i L_i`` with reasoning-intensity weights.

    ``L_i`` is the InfoNCE loss of query i (with gradient); ``L'_i`` the same loss with the
    reasoning query ``rq_i`` against the same passages, without any gradient. When
    ``use_weights`` is False (the first steps of training) the plain mean is used; it may be a
    traced boolean so one compiled step serves both phases.
    """
    losses = per_query_infonce(q, p, group_size=group_size, temperature=temperature,
                               passage_keys=passage_keys)
    if rq.shape != q.shape:
        raise ValueError(f"rq must have the shape of q {q.shape}, got {rq.shape}")
    reasoning_losses = per_query_infonce(
        jax.lax.stop_gradient(rq), jax.lax.stop_gradient(p), group_size=group_size,
        temperature=temperature, passage_keys=passage_keys,
    )
    ri_weights, ri = reasoning_intensity_weights(losses, reasoning_losses, kappa=kappa)
    uniform = jnp.full(losses.shape, 1.0 / losses.shape[0], losses.dtype)
    weights = jnp.where(use_weights, ri_weights, uniform)
    aux: dict[str, Any] = {
        "per_query_loss": losses,
        "reasoning_loss": reasoning_losses,
        "reasoning_intensity": ri,
        "weights": weights,
        # Steps whose RI weights fell back to uniform (a solved batch); 0 during warm-up.
        "ri_uniform": jnp.where(use_weights, ri_weights_degenerate(ri, kappa=kappa), 0.0),
    }
    return jnp.sum(weights * losses), aux


def qwen3_masked_infonce_loss(
    q: Array,
    p: Array,
    *,
    group_size: int,
    temperature: float = 0.02,
    margin: float = 0.1,
    passage_keys: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Qwen3-Embedding's InfoNCE with an enlarged, false-negative-masked denominator.

    ``L_i = -s(q_i, d_i+)/tau + log Z_i`` with
    ``Z_i = e^{s(q_i,d_i+)/tau} + sum_{j != i+} m e^{s(q_i,d_j)/tau} + sum_{j != i} m e^{s(q_i,q_j)/tau}
    + sum_{j != i+} m e^{s(d_i+,d_j)/tau}``, where every term is masked out (m = 0) when its
    cosine exceeds ``s(q_i, d_i+) + margin``. The positive itself (or, with ``passage_keys``, a
    copy of it) is never a negative.
    """
    batch = _check(q, p, group_size)
    qn, pn = _normalize(q), _normalize(p)
    cols = positive_columns(batch, group_size)
    qp = qn @ pn.T  # [B, BG]
    qq = qn @ qn.T  # [B, B]
    dp = pn[cols] @ pn.T  # [B, BG] positive passage vs every passage
    s_pos = qp[jnp.arange(batch), cols]  # [B]
    limit = (s_pos + margin)[:, None]
    not_own_positive = jnp.arange(p.shape[0])[None, :] != cols[:, None]
    duplicates = duplicate_positive_mask(passage_keys, batch, group_size)
    if duplicates is not None:  # a copy of the positive is "the positive itself"
        not_own_positive = not_own_positive & ~duplicates
    not_self = ~jnp.eye(batch, dtype=bool)

    def masked(scores: Array, keep: Array) -> Array:
        return jnp.where(keep & (scores <= limit), scores / temperature, -jnp.inf)

    terms = jnp.concatenate(
        [
            (s_pos / temperature)[:, None],
            masked(qp, not_own_positive),
            masked(qq, not_self),
            masked(dp, not_own_positive),
        ],
        axis=1,
    )
    losses = jax.nn.logsumexp(terms, axis=1) - s_pos / temperature
    weights = jnp.full(losses.shape, 1.0 / batch, losses.dtype)
    return jnp.mean(losses), {"per_query_loss": losses, "weights": weights}
