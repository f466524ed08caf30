"""BM25 baseline: parameter wiring against a hand-written Lucene BM25, and SciFact sanity."""

import json
import math

import numpy as np
import pytest

pytrec_eval = pytest.importorskip("pytrec_eval")

from reasonembed_jax import evaluate as cli  # noqa: E402
from reasonembed_jax.evaluation.bm25 import BM25Retriever  # noqa: E402
from reasonembed_jax.evaluation.datasets import RetrievalTask  # noqa: E402
from reasonembed_jax.retrieval import BM25Index  # noqa: E402


def lucene_bm25(doc_tokens, query_tokens, k1, b):
    """Plain-Python Lucene (>= 8) BM25: idf = ln(1 + (N - df + .5)/(df + .5)); no (k1 + 1)
    factor in the numerator (Lucene dropped it; it does not change rankings)."""
    n = len(doc_tokens)
    avgdl = sum(len(d) for d in doc_tokens) / n
    scores = []
    for doc in doc_tokens:
        s = 0.0
        for term in query_tokens:
            df = sum(term in d for d in doc_tokens)
            tf = doc.count(term)
            if tf == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(s)
    return scores


def test_scores_equal_hand_written_lucene_bm25():
    corpus = ["the cat sat on the mat", "dogs and cats are running", "a cat, a cat, a cat",
              "stock markets fell", "running dogs chase running cats in the park"]
    queries = ["running cats", "cat mat", "markets"]
    task = RetrievalTask(name="toy", corpus_ids=[f"d{i}" for i in range(5)], corpus_texts=corpus,
                         query_ids=["a", "b", "c"], query_texts=queries,
                         qrels={"a": {"d1": 1}, "b": {"d0": 1}, "c": {"d3": 1}})
    retriever = BM25Retriever(k1=0.9, b=0.4, log=lambda m: None)
    result, _ = retriever.search(task, 5)
    index = BM25Index(corpus)
    doc_tokens = index.tokenize(corpus)
    query_tokens = index.tokenize(queries)
    for row, tokens in enumerate(query_tokens):
        expected = lucene_bm25(doc_tokens, tokens, 0.9, 0.4)
        got = dict(zip(result.indices[row], result.scores[row], strict=True))
        for i, value in enumerate(expected):
            assert got[i] == pytest.approx(value, rel=1e-5)


def test_scifact_train_bm25_is_sane(shared_data, tmp_path, capsys):
    """Published BM25 nDCG@10 on SciFact *test* is 0.665-0.679; train qrels should land nearby.
    Measured: 0.6945 (809 queries)."""
    out = tmp_path / "scifact.json"
    cli.main(["--model", "bm25", "--data", f"beir:{shared_data / 'beir_scifact'}",
              "--split", "train", "--top-k", "100", "--out", str(out),
              "--run-dir", str(tmp_path / "runs")])
    results = json.loads(out.read_text())
    task = results["tasks"]["beir_scifact"]
    assert task["num_queries"] == 809
    assert 0.62 < task["ndcg@10"] < 0.76
    # the written run, scored by pytrec_eval, gives the same nDCG@10
    run: dict = {}
    for line in (tmp_path / "runs" / "beir_scifact.run").read_text().splitlines():
        qid, _, doc_id, _, score, _ = line.split()
        run.setdefault(qid, {})[doc_id] = float(score)
    qrels: dict = {}
    for line in (shared_data / "beir_scifact" / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        qid, doc_id, grade = line.split("\t")
        qrels.setdefault(qid, {})[doc_id] = int(grade)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    assert len(ref) == 809
    assert task["ndcg@10"] == pytest.approx(np.mean([m["ndcg_cut_10"] for m in ref.values()]),
                                            abs=1e-12)
