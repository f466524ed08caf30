"""Our trec_eval-style metrics against pytrec_eval on random and constructed runs."""

import numpy as np
import pytest

pytrec_eval = pytest.importorskip("pytrec_eval")

from reasonembed_jax.evaluation.metrics import (  # noqa: E402
    mean_metrics,
    parse_metric,
    per_query_metrics,
    trec_order,
)

METRICS = ("ndcg@1", "ndcg@3", "ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10",
           "mrr@3")
TREC = {"ndcg_cut.1,3,10", "recall.1,10,100", "recip_rank"}


def reference(qrels, run):
    """pytrec_eval values renamed to ours; mrr@k from recip_rank (1/rank kept iff rank <= k)."""
    out = {}
    for qid, m in pytrec_eval.RelevanceEvaluator(qrels, TREC).evaluate(run).items():
        rr = m["recip_rank"]
        out[qid] = {
            "ndcg@1": m["ndcg_cut_1"], "ndcg@3": m["ndcg_cut_3"], "ndcg@10": m["ndcg_cut_10"],
            "recall@1": m["recall_1"], "recall@10": m["recall_10"],
            "recall@100": m["recall_100"],
            "mrr@10": rr if rr > 0 and round(1 / rr) <= 10 else 0.0,
            "mrr@3": rr if rr > 0 and round(1 / rr) <= 3 else 0.0,
        }
    return out


def random_case(rng, num_queries=40, num_docs=150):
    docs = [f"d{i:03d}" for i in range(num_docs)]
    qrels, run = {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        judged = rng.choice(num_docs, size=rng.integers(1, 12), replace=False)
        grades = rng.choice([-1, 0, 1, 1, 2, 3], size=judged.size)
        qrels[qid] = {docs[j]: int(g) for j, g in zip(judged, grades, strict=True)}
        retrieved = rng.choice(num_docs, size=rng.integers(0, 120), replace=False)
        # few distinct values -> many ties; sometimes continuous scores
        if rng.random() < 0.5:
            scores = rng.integers(0, 4, size=retrieved.size).astype(float)
        else:
            scores = rng.standard_normal(retrieved.size)
        run[qid] = {docs[j]: float(s) for j, s in zip(retrieved, scores, strict=True)}
    return qrels, run


@pytest.mark.parametrize("seed", range(6))
def test_equals_pytrec_eval_on_random_runs(seed):
    qrels, run = random_case(np.random.default_rng(seed))
    ours = per_query_metrics(qrels, run, METRICS)
    ref = reference(qrels, run)
    assert set(ref) == set(ours)
    for qid in ref:
        for name in METRICS:
            assert ours[qid][name] == ref[qid][name], (qid, name, ours[qid][name], ref[qid][name])


def test_ties_follow_docid_descending():
    qrels = {"q": {"a": 1, "c": 2}}
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 0.5}}
    assert trec_order(run["q"]) == ["d", "c", "b", "a", "e"]
    ours = per_query_metrics(qrels, run, ("mrr@10", "ndcg@1", "ndcg@2", "recall@2"))["q"]
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut.1,2", "recall.2"}
                                         ).evaluate(run)["q"]
    assert ours["mrr@10"] == ref["recip_rank"] == 0.5
    assert ours["ndcg@1"] == ref["ndcg_cut_1"] == 0.0
    assert ours["ndcg@2"] == ref["ndcg_cut_2"]
    assert ours["recall@2"] == ref["recall_2"] == 0.5


def test_no_relevant_retrieved_and_edge_queries():
    qrels = {
        "none_retrieved": {"x": 1, "y": 2},
        "empty_run": {"x": 1},
        "no_relevant_judged": {"x": 0, "y": -1},
        "missing_from_run": {"x": 1},
    }
    run = {
        "none_retrieved": {"a": 3.0, "b": 2.0, "x0": 1.0},
        "empty_run": {},
        "no_relevant_judged": {"x": 2.0, "y": 1.0},
        "not_in_qrels": {"x": 1.0},
    }
    ours = per_query_metrics(qrels, run, METRICS)
    ref = reference(qrels, run)
    for qid in ref:  # pytrec_eval omits queries absent from the run
        assert ours[qid] == ref[qid]
    assert set(ref) == {"none_retrieved", "empty_run", "no_relevant_judged"}
    # ours keeps the missing query as an empty ranking (trec_eval -c), never drops it
    assert ours["missing_from_run"] == dict.fromkeys(METRICS, 0.0)
    assert "not_in_qrels" not in ours


def test_ndcg_formula_by_hand():
    # ranking: rel 2, rel 0, rel 1 ; ideal: 2, 1
    qrels = {"q": {"a": 2, "b": 0, "c": 1}}
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    dcg = 2 / np.log2(2) + 1 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    assert per_query_metrics(qrels, run, ("ndcg@10",))["q"]["ndcg@10"] == pytest.approx(dcg / idcg)


def test_mean_and_bad_names():
    assert mean_metrics({"a": {"m": 1.0}, "b": {"m": 0.0}}) == {"m": 0.5}
    with pytest.raises(ValueError):
        parse_metric("map@10")
    with pytest.raises(ValueError):
        per_query_metrics({"q": {"a": 1}}, {"q": {"a": float("nan")}})
    with pytest.raises(ValueError):
        mean_metrics({})
