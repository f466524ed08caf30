"""BM25 baseline (bm25s, Lucene variant) behind the same search interface as dense retrieval.

Scoring (Lucene >= 8, which drops the rank-neutral ``(k1 + 1)`` numerator factor):
``sum_t idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))`` with
``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))``; defaults ``k1 = 0.9``, ``b = 0.4``
(Anserini's BEIR setting). Tokens: lower-cased ``\\w\\w+`` words, English stop words removed,
Snowball English stemming (PyStemmer). Each query's full score vector is computed, so excluded
documents are removed before the top-k exactly as in dense search (``top_k_of_scores``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from reasonembed_jax.evaluation.search import SearchResult, top_k_of_scores


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

    def _tokenize(self, texts: Sequence[str], stemmer: object) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=stemmer, return_ids=False,
                              show_progress=False)

    def search(self, task: object, top_k: int) -> tuple[SearchResult, dict]:
        """Indexes ``task.corpus_texts``, ranks ``task.query_texts``; returns result + timings."""
        import bm25s
        import Stemmer

        stemmer = Stemmer.Stemmer(self.language)
        started = time.perf_counter()
        retriever = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        retriever.index(self._tokenize(task.corpus_texts, stemmer), show_progress=False)
        index_seconds = time.perf_counter() - started
        self.log(f"[{task.name}] BM25 index of {len(task.corpus_texts)} documents in "
                 f"{index_seconds:.2f} s")

        started = time.perf_counter()
        query_tokens = self._tokenize(task.query_texts, stemmer)
        excluded = task.excluded_indices()
        num_docs = len(task.corpus_texts)
        parts = []
        for start in range(0, len(query_tokens), self.query_batch_size):
            batch = query_tokens[start : start + self.query_batch_size]
            scores = np.zeros((len(batch), num_docs), dtype=np.float32)
            for row, tokens in enumerate(batch):
                if tokens:  # no indexed token: every document scores 0
                    scores[row] = retriever.get_scores(tokens)
            parts.append(top_k_of_scores(
                scores, top_k,
                excluded=None if excluded is None else excluded[start : start + len(batch)],
            ))
        result = SearchResult(
            scores=np.concatenate([p.scores for p in parts]),
            indices=np.concatenate([p.indices for p in parts]),
        )
        search_seconds = time.perf_counter() - started
        return result, {"index_seconds": index_seconds, "search_seconds": search_seconds}
