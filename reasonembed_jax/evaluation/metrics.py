"""Ranking metrics with trec_eval semantics (``ndcg_cut``, ``recall``, ``recip_rank``), in numpy.

Conventions, all taken from trec_eval 9 (and so from ``pytrec_eval``):

- Ranking: a query's run is ordered by score descending; ties are broken by document id
  descending (byte order of the id string). Retrieved documents missing from the qrels are
  non-relevant.
- ``ndcg@k``: ``DCG@k / IDCG@k`` with ``DCG@k = sum_{i<k} g(d_i) / log2(i + 2)`` (0-based rank
  ``i``) and gain ``g = rel`` for ``rel > 0`` else 0. ``IDCG@k`` uses the positive grades of
  *all* judged documents of the query sorted descending. 0 when the query has no positive grade.
- ``recall@k``: ``|{relevant in top k}| / |{relevant}|`` with relevant meaning ``rel >= 1``;
  0 when the query has no relevant document.
- ``mrr@k``: ``1 / rank`` of the first relevant document (1-based) if ``rank <= k``, else 0.

Sums run in float64 in rank order with the discount computed by C ``log2`` (``math.log2``) and
divided, as trec_eval does, so values equal ``pytrec_eval``'s bit for bit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
_METRIC_RE = re.compile(r"^(ndcg|recall|mrr)@([1-9][0-9]*)$")


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; raises ``ValueError`` for unknown names."""
    match = _METRIC_RE.match(name)
    if match is None:
        raise ValueError(f"unknown metric {name!r}; expected ndcg@K, recall@K or mrr@K")
    return match.group(1), int(match.group(2))


def trec_order(doc_scores: Mapping[str, float]) -> list[str]:
    """Document ids in trec_eval order: score descending, then document id descending."""
    for doc_id, score in doc_scores.items():
        if math.isnan(score):
            raise ValueError(f"score of document {doc_id!r} is NaN")
    return sorted(doc_scores, key=lambda d: (doc_scores[d], d), reverse=True)


def _discounts(n: int) -> np.ndarray:
    return np.array([math.log2(i + 2) for i in range(n)], dtype=np.float64)


def _dcg(gains: np.ndarray) -> float:
    """``sum_i gains[i] / log2(i + 2)`` accumulated sequentially (``cumsum``), like trec_eval."""
    if gains.size == 0:
        return 0.0
    return float(np.cumsum(gains / _discounts(gains.size))[-1])


def query_metrics(
    relevance: Mapping[str, int], ranking: Sequence[str], metrics: Iterable[str] = DEFAULT_METRICS
) -> dict[str, float]:
    """Metrics of one query given its judged grades and its ranked document ids (best first)."""
    grades = np.array([relevance.get(doc_id, 0) for doc_id in ranking], dtype=np.float64)
    num_relevant = sum(1 for g in relevance.values() if g >= 1)
    ideal = np.sort(np.array([g for g in relevance.values() if g > 0], dtype=np.float64))[::-1]
    is_relevant = grades >= 1
    first_relevant = int(np.argmax(is_relevant)) + 1 if is_relevant.any() else None
    out: dict[str, float] = {}
    for name in metrics:
        kind, k = parse_metric(name)
        if kind == "ndcg":
            idcg = _dcg(ideal[:k])
            out[name] = _dcg(np.maximum(grades[:k], 0.0)) / idcg if idcg > 0 else 0.0
        elif kind == "recall":
            out[name] = float(is_relevant[:k].sum()) / num_relevant if num_relevant else 0.0
        else:  # mrr
            out[name] = 1.0 / first_relevant if first_relevant and first_relevant <= k else 0.0
    return out


def per_query_metrics(
    qrels: Qrels, run: Run, metrics: Iterable[str] = DEFAULT_METRICS
) -> dict[str, dict[str, float]]:
    """Metrics of every query in ``qrels``.

    A query of ``qrels`` absent from ``run`` scores as an empty ranking (all zeros; trec_eval
    ``-c``), so nothing is silently dropped from an average. Run queries without qrels are
    ignored, as in trec_eval.
    """
    metrics = tuple(metrics)
    for name in metrics:
        parse_metric(name)
    return {
        qid: query_metrics(relevance, trec_order(run.get(qid, {})), metrics)
        for qid, relevance in qrels.items()
    }


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Arithmetic mean of each metric over queries; empty input raises ``ValueError``."""
    if not per_query:
        raise ValueError("no queries to average")
    names = next(iter(per_query.values())).keys()
    return {name: float(np.mean([m[name] for m in per_query.values()])) for name in names}
