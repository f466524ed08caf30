"""The retrieval toolbox shared by training-data mining, evaluation and synthesis (numpy only).

One implementation of each:

* ranking: ``top_k_indices`` (one score row) and ``top_k_of_scores`` (a ``[Q, N]`` matrix with
  per-query exclusions, as a ``SearchResult``). Order: descending score, ties (-0.0 == 0.0 too)
  to the lower index, NaN after every number. (Exact search on accelerators:
  ``evaluation.search.exact_search``.)
* BM25: ``BM25Index`` and ``bm25_scores`` (bm25s, Lucene variant; see ``BM25Index``).
* NV-Retriever's positive-aware negatives (method.md section 7). With ``s_min = min_p s(q, p)``
  over the query's positives, a candidate ``n`` is kept iff

  - ``perc_pos`` (TopK-PercPos):     ``s(q, n) < perc * s_min``   (perc = 0.95)
  - ``margin_pos`` (TopK-MarginPos): ``s(q, n) < s_min - margin`` (margin = 0.05)
  - ``none``: always.

  ``nv_threshold``, ``positive_aware_mask``, ``rank_candidates``, ``draw_negatives`` and
  ``select_negatives``.

Imports only numpy and the standard library (bm25s and PyStemmer when BM25 is used), so the
synthesis environment, which has no JAX, uses it too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

FILTERS = ("perc_pos", "margin_pos", "none")
NV_METHODS = ("perc_pos", "margin_pos")  # the filters with a threshold


# ------------------------------------------------------------------------------ ranking


def top_k_indices(scores: np.ndarray, k: int | None = None, *,
                  allowed: np.ndarray | None = None) -> np.ndarray:
    """Indices (int64) of the ``k`` best entries of a 1-D ``scores`` (all of them when None),
    best first: descending score, ties to the lower index, NaN after every number. Only
    ``allowed`` entries (a boolean mask) are ranked."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"expected 1-D scores, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    index = np.arange(len(scores)) if allowed is None else np.flatnonzero(allowed)
    neg = -(scores if allowed is None else scores[index])  # ascending order of neg = best first
    if k is None or k >= len(neg):
        order = np.argsort(neg, kind="stable")
    elif k <= 0:
        order = np.zeros(0, dtype=np.int64)
    else:
        kth = np.partition(neg, k - 1)[k - 1]  # the k-th best score (NaN: fewer than k numbers)
        if np.isnan(kth):
            order = np.argsort(neg, kind="stable")[:k]
        else:
            # every entry at least as good as the k-th, in index order; a stable sort of those
            # is the start of the full stable order
            near = np.flatnonzero(neg <= kth)
            order = near[np.argsort(neg[near], kind="stable")][:k]
    return index[order].astype(np.int64, copy=False)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Top-k per query: ``scores`` float32 ``[Q, k]`` (descending) and ``indices`` int64 ``[Q, k]``.

    Entries with score ``-inf`` are not results (excluded documents or fewer than k candidates)
    and are skipped by ``to_run``.
    """

    scores: np.ndarray
    indices: np.ndarray

    def to_run(
        self, query_ids: Sequence[str], doc_ids: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """``{query_id: {doc_id: score}}`` with ``-inf`` entries dropped."""
        if len(query_ids) != self.scores.shape[0]:
            raise ValueError(f"{len(query_ids)} query ids for {self.scores.shape[0]} result rows")
        run: dict[str, dict[str, float]] = {}
        for qid, row_scores, row_indices in zip(query_ids, self.scores, self.indices, strict=True):
            keep = np.isfinite(row_scores)
            run[qid] = {
                doc_ids[int(i)]: float(s)
                for s, i in zip(row_scores[keep], row_indices[keep], strict=True)
            }
        return run


def top_k_of_scores(
    score_rows: np.ndarray,
    top_k: int,
    *,
    excluded: Sequence[Sequence[int]] | None = None,
) -> SearchResult:
    """Top-``min(top_k, N)`` of precomputed ``[Q, N]`` scores (e.g. BM25), ranked in float32.

    Each query's ``excluded`` document indices (out-of-range ones ignored) are removed from its
    full score list before the top-k (the BRIGHT reference order), as in ``exact_search``.
    Excluded, ``-inf`` and NaN scores are not results: score ``-inf``, index -1, at the end.
    """
    num_queries, num_docs = score_rows.shape
    if num_docs == 0:
        raise ValueError("the corpus is empty")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if excluded is not None and len(excluded) != num_queries:
        raise ValueError(f"excluded has {len(excluded)} rows for {num_queries} queries")
    k = min(top_k, num_docs)
    scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
    indices = np.full((num_queries, k), -1, dtype=np.int64)
    for q in range(num_queries):
        row = np.asarray(score_rows[q], dtype=np.float32)
        if excluded is not None and len(excluded[q]):
            drop = np.asarray(excluded[q], dtype=np.int64)
            row = row.copy()
            row[drop[(drop >= 0) & (drop < num_docs)]] = -np.inf
        order = top_k_indices(row, k)
        order = order[row[order] > -np.inf]  # -inf and NaN (ranked last) are not results
        scores[q, : len(order)] = row[order]
        indices[q, : len(order)] = order
    return SearchResult(scores=scores, indices=indices)


# ------------------------------------------------------------------------------ BM25


class BM25Index:
    """BM25 over a fixed corpus with bm25s (Lucene variant).

    Scoring (Lucene >= 8, which drops the rank-neutral ``(k1 + 1)`` numerator factor):
    ``sum_t idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))`` with
    ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))``; defaults ``k1 = 0.9``, ``b = 0.4``
    (Anserini's BEIR setting). Tokens: lower-cased ``\\w\\w+`` words, English stop words removed,
    Snowball stemming in ``language`` (PyStemmer; None: no stemming).
    """

    def __init__(self, corpus: Sequence[str], *, k1: float = 0.9, b: float = 0.4,
                 language: str | None = "english") -> None:
        import bm25s

        # bm25s sets its own logger to DEBUG on import; keep its per-call chatter out of our logs.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        self.stemmer = None
        if language:
            import Stemmer

            self.stemmer = Stemmer.Stemmer(language)
        self.num_docs = len(corpus)
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._bm25.index(self.tokenize(corpus), show_progress=False)

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        """The BM25 tokens of each text."""
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=self.stemmer,
                              return_ids=False, show_progress=False)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """Float32 ``[Q, N]`` scores; a query without indexed tokens scores 0 everywhere."""
        out = np.zeros((len(queries), self.num_docs), dtype=np.float32)
        for row, tokens in enumerate(self.tokenize(queries)):
            if tokens:
                out[row] = self._bm25.get_scores(tokens)
        return out


def bm25_scores(queries: Sequence[str], corpus: Sequence[str], *, k1: float = 0.9,
                b: float = 0.4, stemmer_language: str | None = "english") -> np.ndarray:
    """Full BM25 score matrix ``[Q, N]`` (float64 of ``BM25Index.scores``)."""
    index = BM25Index(corpus, k1=k1, b=b, language=stemmer_language)
    return index.scores(queries).astype(np.float64)


# ------------------------------------------------------------------------------ NV-Retriever


def nv_threshold(min_positive_score: float | np.ndarray, method: str, perc: float = 0.95,
                 margin: float = 0.05) -> float | np.ndarray:
    """The score a negative must stay strictly below (elementwise): ``perc * s_min`` for
    ``perc_pos``, ``s_min - margin`` for ``margin_pos``."""
    if method == "perc_pos":
        return perc * min_positive_score
    if method == "margin_pos":
        return min_positive_score - margin
    raise ValueError(f"unknown filter '{method}', expected one of {NV_METHODS}")


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
    (``s_min``). ``perc_pos`` and ``margin_pos``: ``s < nv_threshold(s_min)``; ``none``: all
    true. NaN scores never survive a filter.
    """
    scores = np.asarray(candidate_scores, dtype=np.float64)
    s_min = np.asarray(min_positive_scores, dtype=np.float64)
    if scores.ndim != 2 or s_min.shape != (scores.shape[0],):
        raise ValueError(f"expected scores [Q, K] and s_min [Q], got {scores.shape}, {s_min.shape}")
    if method == "none":
        return np.ones(scores.shape, dtype=bool)
    if method not in NV_METHODS:
        raise ValueError(f"unknown filter '{method}', expected one of {FILTERS}")
    return scores < nv_threshold(s_min, method, perc, margin)[:, None]


def rank_candidates(
    scores: np.ndarray, positives: Sequence[Sequence[int]], depth: int,
    excluded: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From full score rows ``[Q, N]``: top-``depth`` non-positive candidates and ``s_min``.

    Returns ``(candidate_ids [Q, depth], candidate_scores [Q, depth], s_min [Q])``, candidates
    in ``top_k_indices`` order; excluded and positive ids never appear, nor do non-finite scores
    among the top ``depth``. Rows with fewer than ``depth`` candidates are padded with id -1 and
    score -inf.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_q, n_docs = scores.shape
    ids_out = np.full((n_q, depth), -1, dtype=np.int64)
    scores_out = np.full((n_q, depth), -np.inf, dtype=np.float64)
    s_min = np.empty((n_q,), dtype=np.float64)
    for q in range(n_q):
        row = scores[q]
        pos = np.asarray(list(positives[q]), dtype=np.int64)
        if len(pos) == 0:
            raise ValueError(f"query {q} has no positive")
        s_min[q] = row[pos].min()
        allowed = np.ones(n_docs, dtype=bool)
        allowed[pos] = False
        if excluded is not None and len(excluded[q]):
            allowed[np.asarray(list(excluded[q]), dtype=np.int64)] = False
        order = top_k_indices(row, depth, allowed=allowed)
        order = order[np.isfinite(row[order])]
        ids_out[q, : len(order)] = order
        scores_out[q, : len(order)] = row[order]
    return ids_out, scores_out, s_min


def draw_negatives(ranked: np.ndarray, num_negatives: int, *, sample_from_top: int | None = None,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """The negatives among ``ranked`` (surviving candidates, best first), in rank order: the
    first ``num_negatives``, or with ``sample_from_top=K > num_negatives``, ``num_negatives``
    drawn without replacement from the first K."""
    ranked = np.asarray(ranked)
    if sample_from_top is not None and sample_from_top > num_negatives:
        if rng is None:
            raise ValueError("sample_from_top needs an rng")
        top = min(sample_from_top, len(ranked))
        ranked = ranked[np.sort(rng.choice(top, size=min(num_negatives, top), replace=False))]
    return ranked[:num_negatives]


def select_negatives(
    candidate_ids: np.ndarray,
    keep: np.ndarray,
    num_negatives: int,
    *,
    sample_from_top: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Per query, ``draw_negatives`` over the kept candidates (``candidate_ids [Q, K]`` sorted by
    descending score, as from ``rank_candidates``); padding ids (-1) are never chosen. One
    ``rng`` serves all queries in turn."""
    candidate_ids = np.asarray(candidate_ids)
    keep = np.asarray(keep, dtype=bool) & (candidate_ids >= 0)
    return [draw_negatives(candidate_ids[q][keep[q]], num_negatives,
                           sample_from_top=sample_from_top, rng=rng)
            for q in range(candidate_ids.shape[0])]
