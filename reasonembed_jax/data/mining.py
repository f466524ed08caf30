"""Teacher scores for hard-negative mining (method.md section 7).

A teacher (BM25: ``retrieval.bm25_scores``, or an embedder: ``embedding_scores``) scores every
corpus document for each query; ``reasonembed_jax.retrieval`` then ranks the candidates, applies
NV-Retriever's positive-aware filters and picks the negatives (``build_records.mine_negatives``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    """What mining needs from an embedder (``reasonembed_jax.encode.TextEncoder`` fits)."""

    def encode(self, texts: Sequence[str], instruction: str | None = None,
               **kwargs: Any) -> np.ndarray: ...


def embedding_scores(embedder: Embedder, queries: Sequence[str], corpus: Sequence[str], *,
                     instruction: str | None, batch_size: int = 32) -> np.ndarray:
    """Cosine score matrix ``[Q, N]`` from an embedder that returns L2-normalised rows."""
    q = np.asarray(embedder.encode(list(queries), instruction=instruction, batch_size=batch_size))
    d = np.asarray(embedder.encode(list(corpus), instruction=None, batch_size=batch_size))
    return (q.astype(np.float32) @ d.astype(np.float32).T).astype(np.float64)
