"""Hard-negative mining with NV-Retriever's positive-aware filters (method.md section 7).

A teacher (BM25 or an embedder) scores candidates for each query; positives are removed; a filter
drops candidates that score too close to the positives (likely false negatives); the negatives are
the top survivors (or ``num_negatives`` drawn from the top ``sample_from_top`` survivors).

With ``s_min = min_p s(q, p)`` over the query's positives:

* ``perc_pos`` (TopK-PercPos):   keep n iff ``s(q, n) < perc * s_min``   (perc = 0.95)
* ``margin_pos`` (TopK-MarginPos): keep n iff ``s(q, n) < s_min - margin`` (margin = 0.05)
* ``none``: keep every non-positive candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

FILTERS = ("perc_pos", "margin_pos", "none")


class Embedder(Protocol):
    """What mining needs from an embedder (``reasonembed_jax.encode.TextEncoder`` fits)."""

    def encode(self, texts: Sequence[str], instruction: str | None = None,
               **kwargs: Any) -> np.ndarray: ...


def positive_aware_mask(
    candidate_scores: np.ndarray,
    min_positive_scores: np.ndarray,
    method: str = "perc_pos",
    *,
    perc: float = 0.95,
    margin: float = 0.05,
) -> np.ndarray:
    """Boolean ``[Q, K]`` mask of candidates that survive the filter.

    ``candidate_scores`` is ``[Q, K]`` (``s(q, n)``), ``min_positive_scores`` is ``[Q]``
    (``s_min``). ``perc_pos``: ``s < perc * s_min``; ``margin_pos``: ``s < s_min - margin``;
    ``none``: all true. NaN scores never survive a filter.
    """
    scores = np.asarray(candidate_scores, dtype=np.float64)
    s_min = np.asarray(min_positive_scores, dtype=np.float64)
    if scores.ndim != 2 or s_min.shape != (scores.shape[0],):
        raise ValueError(f"expected scores [Q, K] and s_min [Q], got {scores.shape}, {s_min.shape}")
    if method == "perc_pos":
        return scores < perc * s_min[:, None]
    if method == "margin_pos":
        return scores < (s_min - margin)[:, None]
    if method == "none":
        return np.ones(scores.shape, dtype=bool)
    raise ValueError(f"unknown filter '{method}', expected one of {FILTERS}")


def select_negatives(
    candidate_ids: np.ndarray,
    candidate_scores: np.ndarray,
    keep: np.ndarray,
    num_negatives: int,
    *,
    sample_from_top: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Per query, the negatives among the kept candidates, best score first.

    Candidates must come sorted by descending score; padding ids (-1) are never chosen. With
    ``sample_from_top=K`` the negatives are ``num_negatives`` drawn without replacement from the
    top K kept candidates (kept in score order); otherwise the top ``num_negatives`` kept ones.
    """
    keep = np.asarray(keep, dtype=bool) & (np.asarray(candidate_ids) >= 0)
    out = []
    for q in range(candidate_ids.shape[0]):
        ids = candidate_ids[q][keep[q]]
        scores = candidate_scores[q][keep[q]]
        if sample_from_top is not None and sample_from_top > num_negatives:
            if rng is None:
                raise ValueError("sample_from_top needs an rng")
            top = min(sample_from_top, len(ids))
            chosen = np.sort(rng.choice(top, size=min(num_negatives, top), replace=False))
            ids, scores = ids[chosen], scores[chosen]
        out.append(ids[:num_negatives])
    return out


def rank_candidates(
    scores: np.ndarray, positives: Sequence[Sequence[int]], depth: int,
    excluded: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From full score rows ``[Q, N]``: top-``depth`` non-positive candidates and ``s_min``.

    Returns ``(candidate_ids [Q, depth], candidate_scores [Q, depth], s_min [Q])``, candidates
    sorted by descending score (ties by id); excluded and positive ids never appear. Rows with
    fewer than ``depth`` candidates are padded with id -1 and score -inf.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_q, n_docs = scores.shape
    ids_out = np.full((n_q, depth), -1, dtype=np.int64)
    scores_out = np.full((n_q, depth), -np.inf, dtype=np.float64)
    s_min = np.empty((n_q,), dtype=np.float64)
    for q in range(n_q):
        row = scores[q].copy()
        pos = np.asarray(list(positives[q]), dtype=np.int64)
        if len(pos) == 0:
            raise ValueError(f"query {q} has no positive")
        s_min[q] = row[pos].min()
        row[pos] = -np.inf
        if excluded is not None and len(excluded[q]):
            row[np.asarray(list(excluded[q]), dtype=np.int64)] = -np.inf
        order = np.lexsort((np.arange(n_docs), -row))[:depth]
        order = order[np.isfinite(row[order])]
        ids_out[q, : len(order)] = order
        scores_out[q, : len(order)] = row[order]
    return ids_out, scores_out, s_min


def bm25_scores(queries: Sequence[str], corpus: Sequence[str], *, k1: float = 0.9,
                b: float = 0.4, stemmer_language: str | None = "english") -> np.ndarray:
    """Full BM25 score matrix ``[Q, N]`` (bm25s, Lucene variant, English stop words + stemming)."""
    import bm25s

    # bm25s sets its own logger to DEBUG on import; keep its per-call chatter out of our logs.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    stemmer = None
    if stemmer_language:
        import Stemmer

        stemmer = Stemmer.Stemmer(stemmer_language)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(bm25s.tokenize(list(corpus), stopwords="en", stemmer=stemmer,
                                   show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(list(queries), stopwords="en", stemmer=stemmer,
                            show_progress=False, return_ids=False)
    return np.stack([retriever.get_scores(t) for t in tokens]).astype(np.float64)


def embedding_scores(embedder: Embedder, queries: Sequence[str], corpus: Sequence[str], *,
                     instruction: str | None, batch_size: int = 32) -> np.ndarray:
    """Cosine score matrix ``[Q, N]`` from an embedder that returns L2-normalised rows."""
    q = np.asarray(embedder.encode(list(queries), instruction=instruction, batch_size=batch_size))
    d = np.asarray(embedder.encode(list(corpus), instruction=None, batch_size=batch_size))
    return (q.astype(np.float32) @ d.astype(np.float32).T).astype(np.float64)
