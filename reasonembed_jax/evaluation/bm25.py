"""BM25 baseline (``retrieval.BM25Index``: bm25s, Lucene variant, k1 0.9, b 0.4) behind the same
search interface as dense retrieval. Each query's full score vector is computed, so excluded
documents are removed before the top-k exactly as in dense search (``retrieval.top_k_of_scores``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from reasonembed_jax.retrieval import BM25Index, SearchResult, top_k_of_scores


class BM25Retriever:
    """``search(task, top_k) -> SearchResult`` with bm25s; instructions are ignored (lexical)."""

    name = "bm25"

    def __init__(
        self,
        k1: float = 0.9,
        b: float = 0.4,
        language: str = "english",
        query_batch_size: int = 64,
        log: Callable[[str], None] = print,
    ) -> None:
        self.k1, self.b, self.language = k1, b, language
        self.query_batch_size = query_batch_size
        self.log = log

    def describe(self) -> dict:
        return {"model": "bm25", "library": "bm25s", "k1": self.k1, "b": self.b,
                "stemmer": self.language, "stopwords": "en"}

    def search(self, task: object, top_k: int) -> tuple[SearchResult, dict]:
        """Indexes ``task.corpus_texts``, ranks ``task.query_texts``; returns result + timings."""
        started = time.perf_counter()
        index = BM25Index(task.corpus_texts, k1=self.k1, b=self.b, language=self.language)
        index_seconds = time.perf_counter() - started
        self.log(f"[{task.name}] BM25 index of {len(task.corpus_texts)} documents in "
                 f"{index_seconds:.2f} s")

        started = time.perf_counter()
        excluded = task.excluded_indices()
        queries = list(task.query_texts)
        parts = []
        for start in range(0, len(queries), self.query_batch_size):
            batch = queries[start : start + self.query_batch_size]
            parts.append(top_k_of_scores(
                index.scores(batch), top_k,
                excluded=None if excluded is None else excluded[start : start + len(batch)],
            ))
        result = SearchResult(
            scores=np.concatenate([p.scores for p in parts]),
            indices=np.concatenate([p.indices for p in parts]),
        )
        search_seconds = time.perf_counter() - started
        return result, {"index_seconds": index_seconds, "search_seconds": search_seconds}
