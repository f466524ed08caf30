"""Exact search against a numpy full sort, and excluded-id handling against the BRIGHT reference
order (drop excluded ids from the full score list, then take the top k)."""

import jax
import numpy as np
import pytest

pytrec_eval = pytest.importorskip("pytrec_eval")

from reasonembed_jax.evaluation.metrics import per_query_metrics  # noqa: E402
from reasonembed_jax.evaluation.search import exact_search, excluded_index_matrix  # noqa: E402
from reasonembed_jax.retrieval import top_k_of_scores  # noqa: E402


def reference_top_k(scores, k, excluded=None):
    """float64 full scores, excluded -> -inf, stable descending sort (lower index first on ties)."""
    scores = scores.astype(np.float64).copy()
    for row, ex in enumerate(excluded or []):
        scores[row, list(ex)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def grid_embeddings(rng, n, dim):
    # values on a coarse grid so float32 dot products are exact and ties are real
    return rng.integers(-3, 4, size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize(
    ("num_docs", "chunk", "qbatch", "k"),
    [(1000, 96, 5, 50), (37, 8, 64, 37), (37, 1000, 3, 100), (513, 64, 7, 1)],
)
def test_exact_search_matches_full_sort(num_docs, chunk, qbatch, k):
    assert jax.device_count() == 8  # conftest: the corpus is split over 8 devices
    rng = np.random.default_rng(num_docs + chunk)
    queries = grid_embeddings(rng, 13, 8)
    corpus = grid_embeddings(rng, num_docs, 8)
    excluded = [rng.choice(num_docs, size=rng.integers(0, 6), replace=False).tolist()
                for _ in range(13)]
    got = exact_search(queries, corpus, k, excluded=excluded, corpus_chunk_size=chunk,
                       query_batch_size=qbatch)
    ref_scores, ref_indices = reference_top_k(queries @ corpus.T, k, excluded)
    kk = min(k, num_docs)
    assert got.scores.shape == (13, kk)
    np.testing.assert_array_equal(got.scores, ref_scores.astype(np.float32))
    finite = np.isfinite(ref_scores)
    np.testing.assert_array_equal(got.indices[finite], ref_indices[finite])
    for row, ex in enumerate(excluded):  # excluded docs never come back as results
        assert not set(got.indices[row][np.isfinite(got.scores[row])]) & set(ex)


def test_top_k_of_scores_matches_full_sort():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 20, size=(9, 300)).astype(np.float32)
    excluded = [[0, 1, 2], [], [299]] + [[]] * 6
    got = top_k_of_scores(scores, 40, excluded=excluded)
    ref_scores, ref_indices = reference_top_k(scores, 40, excluded)
    np.testing.assert_array_equal(got.scores, ref_scores)
    np.testing.assert_array_equal(got.indices, ref_indices)


def test_excluded_ids_reference_order_changes_top10():
    """30 documents with distinct scores; the query's best 4 documents are excluded. The BRIGHT
    reference removes them from the full list, so ranks 5..14 form the top 10. Filtering after a
    top-10 (the wrong order) would leave only 6 results and a different nDCG@10."""
    num_docs, k = 30, 10
    doc_ids = [f"doc{i:02d}" for i in range(num_docs)]
    corpus = np.eye(num_docs, dtype=np.float32)
    query = (np.arange(num_docs, 0, -1, dtype=np.float32) / num_docs)[None]  # doc00 best
    excluded_ids = ["doc00", "doc01", "doc02", "doc03"]
    qrels_eval = {"q": {"doc12": 1, "doc13": 1}}

    # reference: full score dict, pop excluded, sort, take top k (BRIGHT's evaluation code order)
    full = {d: float(s) for d, s in zip(doc_ids, (query @ corpus.T)[0], strict=True)}
    for d in excluded_ids:
        full.pop(d)
    ref_top = dict(sorted(full.items(), key=lambda x: x[1], reverse=True)[:k])

    got = exact_search(query, corpus, k, excluded=[[doc_ids.index(d) for d in excluded_ids]],
                       corpus_chunk_size=16)
    run = got.to_run(["q"], doc_ids)
    assert list(run["q"]) == list(ref_top)
    assert list(run["q"]) == [f"doc{i:02d}" for i in range(4, 14)]

    ours = per_query_metrics(qrels_eval, run, ("ndcg@10", "recall@10"))["q"]
    ref = pytrec_eval.RelevanceEvaluator(qrels_eval, {"ndcg_cut.10", "recall.10"}).evaluate(
        {"q": ref_top})["q"]
    assert ours["ndcg@10"] == ref["ndcg_cut_10"] and ours["recall@10"] == ref["recall_10"] == 1.0

    # the wrong order (top-10 first, then drop excluded) loses doc12/doc13: the case discriminates
    no_excl = exact_search(query, corpus, k, corpus_chunk_size=16).to_run(["q"], doc_ids)["q"]
    post = {d: s for d, s in no_excl.items() if d not in excluded_ids}
    assert len(post) == 6
    wrong = per_query_metrics(qrels_eval, {"q": post}, ("recall@10",))["q"]["recall@10"]
    assert wrong == 0.0


def test_fewer_documents_than_k_and_all_excluded():
    corpus = np.eye(4, dtype=np.float32)
    q = np.ones((2, 4), dtype=np.float32)
    got = exact_search(q, corpus, 10, excluded=[[0, 1, 2, 3], [1]])
    run = got.to_run(["a", "b"], ["w", "x", "y", "z"])
    assert run["a"] == {}
    assert set(run["b"]) == {"w", "y", "z"}


def test_errors():
    with pytest.raises(ValueError, match="sizes differ"):
        exact_search(np.ones((1, 3), np.float32), np.ones((2, 4), np.float32), 1)
    with pytest.raises(ValueError, match="top_k"):
        exact_search(np.ones((1, 3), np.float32), np.ones((2, 3), np.float32), 0)
    with pytest.raises(ValueError, match="non-finite"):
        exact_search(np.ones((1, 3), np.float32), np.full((2, 3), np.nan, np.float32), 1)
    assert excluded_index_matrix([[1, 2, 3], []], 2).shape == (2, 4)
