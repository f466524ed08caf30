"""Exact top-k search on jax devices with per-query exclusions.

Dense search scores ``s(q, d) = <e_q, e_d>`` (cosine for L2-normalised embeddings) for every
document. The corpus streams from host memory in fixed-size chunks; each chunk is split over
all devices, every device keeps the top-k of its slice, and the candidates are merged into a
running top-k per query. Device memory is ``O(query_batch * chunk / devices)`` whatever the
corpus size, and the host array may be a memory map.

Excluded documents are set to ``-inf`` in a query's scores *before* any top-k, i.e. they are
removed from the full score list (the BRIGHT reference order), so the k results returned are the
k best non-excluded documents. Ties keep the lower document index (``jax.lax.top_k`` is stable
and the merge keeps earlier chunks first). Top-k of a precomputed score matrix (BM25) on the host,
with the same rules: ``reasonembed_jax.retrieval.top_k_of_scores``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reasonembed_jax.retrieval import SearchResult

NEG_INF = float("-inf")


def excluded_index_matrix(excluded: Sequence[Sequence[int]] | None, num_queries: int) -> np.ndarray:
    """Pads per-query excluded document indices into an int32 ``[Q, E]`` matrix (-1 = padding).

    ``E`` is rounded up to a power of two so that recompilation happens rarely.
    """
    if excluded is None:
        return np.full((num_queries, 1), -1, dtype=np.int32)
    if len(excluded) != num_queries:
        raise ValueError(f"excluded has {len(excluded)} rows for {num_queries} queries")
    width = max((len(e) for e in excluded), default=0)
    width = 1 << max(width - 1, 0).bit_length()
    out = np.full((num_queries, width), -1, dtype=np.int32)
    for row, indices in enumerate(excluded):
        if len(indices):
            out[row, : len(indices)] = np.asarray(indices, dtype=np.int32)
    return out


def _mask_and_top_k(
    scores: jax.Array, start: jax.Array, num_valid: jax.Array, excluded: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """Top-k of a ``[Q, C]`` score block whose column ``j`` is document ``start + j``.

    Columns at or beyond ``num_valid`` (padding) and each row's excluded documents are set to
    ``-inf`` first. Returns scores and *global* document indices.
    """
    width = scores.shape[1]
    column = jnp.arange(width, dtype=jnp.int32)
    scores = jnp.where((start + column < num_valid)[None, :], scores, NEG_INF)
    local = excluded - start
    inside = (excluded >= 0) & (local >= 0) & (local < width)
    local = jnp.where(inside, local, width)  # out of range: dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(scores.shape[0])[:, None], local.shape)
    scores = scores.at[rows, local].set(NEG_INF, mode="drop")
    top_scores, top_columns = jax.lax.top_k(scores, k)
    return top_scores, top_columns.astype(jnp.int32) + start


def _merge(best_scores: jax.Array, best_indices: jax.Array, scores: jax.Array, indices: jax.Array):
    """Running top-k update; previous results come first so ties keep lower document indices."""
    all_scores = jnp.concatenate([best_scores, scores], axis=1)
    all_indices = jnp.concatenate([best_indices, indices], axis=1)
    top_scores, position = jax.lax.top_k(all_scores, best_scores.shape[1])
    return top_scores, jnp.take_along_axis(all_indices, position, axis=1)


@functools.lru_cache(maxsize=16)
def _dense_step(mesh: jax.sharding.Mesh, per_device: int, local_k: int):
    """Jitted ``(best_s, best_i, queries, chunk[n_dev, per_device, D], offset, n, excl)``."""
    axis = mesh.axis_names[0]

    def local_part(
        queries: jax.Array, chunk: jax.Array, offset: jax.Array, num_valid: jax.Array,
        excluded: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        device = jax.lax.axis_index(axis)
        start = offset + device * per_device
        scores = jnp.einsum(
            "qd,pd->qp", queries, chunk[0], precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        top_scores, top_indices = _mask_and_top_k(scores, start, num_valid, excluded, local_k)
        return top_scores[None], top_indices[None]

    sharded = jax.shard_map(
        local_part,
        mesh=mesh,
        in_specs=(P(), P(axis), P(), P(), P()),
        out_specs=(P(axis), P(axis)),
    )

    def step(
        best_scores: jax.Array, best_indices: jax.Array, queries: jax.Array, chunk: jax.Array,
        offset: jax.Array, num_valid: jax.Array, excluded: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        scores, indices = sharded(queries, chunk, offset, num_valid, excluded)
        n_dev, n_q, k = scores.shape
        scores = jnp.transpose(scores, (1, 0, 2)).reshape(n_q, n_dev * k)
        indices = jnp.transpose(indices, (1, 0, 2)).reshape(n_q, n_dev * k)
        return _merge(best_scores, best_indices, scores, indices)

    return jax.jit(step, donate_argnums=(0, 1))


def _corpus_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh(
        (jax.device_count(),), ("corpus",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def exact_search(
    query_embeddings: np.ndarray,
    corpus_embeddings: np.ndarray,
    top_k: int,
    *,
    excluded: Sequence[Sequence[int]] | None = None,
    query_batch_size: int = 256,
    corpus_chunk_size: int = 65536,
) -> SearchResult:
    """Exact inner-product top-k of every query over the whole corpus.

    Args:
      query_embeddings: ``[Q, D]`` array.
      corpus_embeddings: ``[N, D]`` host array (``np.memmap`` is fine: read chunk by chunk).
      top_k: results per query; ``min(top_k, N)`` are returned.
      excluded: per query, corpus row indices removed from that query's score list before top-k.
      query_batch_size: queries scored together against a chunk.
      corpus_chunk_size: documents sent to the devices per step (split over all devices).
    """
    if query_embeddings.ndim != 2 or corpus_embeddings.ndim != 2:
        raise ValueError("query and corpus embeddings must be 2-D")
    if query_embeddings.shape[1] != corpus_embeddings.shape[1]:
        raise ValueError(
            f"embedding sizes differ: queries {query_embeddings.shape[1]}, "
            f"corpus {corpus_embeddings.shape[1]}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not np.isfinite(query_embeddings).all():
        raise ValueError("query embeddings contain non-finite values")
    num_queries, dim = query_embeddings.shape
    num_docs = corpus_embeddings.shape[0]
    if num_docs == 0:
        raise ValueError("the corpus is empty")
    excluded_matrix = excluded_index_matrix(excluded, num_queries)

    mesh = _corpus_mesh()
    n_dev = mesh.devices.size
    per_device = -(-min(corpus_chunk_size, num_docs) // n_dev)
    chunk_size = per_device * n_dev
    k = min(top_k, num_docs)
    local_k = min(k, per_device)
    step = _dense_step(mesh, per_device, local_k)
    chunk_sharding = NamedSharding(mesh, P("corpus"))
    replicated = NamedSharding(mesh, P())

    batch = min(query_batch_size, num_queries)
    num_batches = -(-num_queries // batch)
    queries = np.zeros((num_batches * batch, dim), dtype=np.float32)
    queries[:num_queries] = query_embeddings
    excl = np.full((num_batches * batch, excluded_matrix.shape[1]), -1, dtype=np.int32)
    excl[:num_queries] = excluded_matrix
    query_batches = [
        (
            jax.device_put(queries[b * batch : (b + 1) * batch], replicated),
            jax.device_put(excl[b * batch : (b + 1) * batch], replicated),
        )
        for b in range(num_batches)
    ]
    best = [
        (
            jax.device_put(np.full((batch, k), NEG_INF, np.float32), replicated),
            jax.device_put(np.full((batch, k), -1, np.int32), replicated),
        )
        for _ in range(num_batches)
    ]
    num_valid = jnp.int32(num_docs)
    for offset in range(0, num_docs, chunk_size):
        block = np.asarray(corpus_embeddings[offset : offset + chunk_size], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"corpus embeddings contain non-finite values (rows {offset}+)")
        if block.shape[0] < chunk_size:
            block = np.concatenate(
                [block, np.zeros((chunk_size - block.shape[0], dim), np.float32)]
            )
        chunk = jax.device_put(block.reshape(n_dev, per_device, dim), chunk_sharding)
        for b, (q, e) in enumerate(query_batches):
            best[b] = step(*best[b], q, chunk, jnp.int32(offset), num_valid, e)
    scores = np.concatenate([np.asarray(s) for s, _ in best])[:num_queries]
    indices = np.concatenate([np.asarray(i) for _, i in best])[:num_queries].astype(np.int64)
    return SearchResult(scores=scores, indices=indices)
