"""The retrieval toolbox against brute-force Python formulas, and its import without JAX."""

import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from reasonembed_jax import retrieval

REPO = pathlib.Path(__file__).resolve().parents[1]


def reference_order(scores, allowed=None):
    """All allowed positions, best first: descending score, lower position first on ties, NaN
    after every number (a plain Python sort)."""
    positions = [i for i in range(len(scores)) if allowed is None or allowed[i]]
    return sorted(positions, key=lambda i: (math.isnan(scores[i]),
                                            0.0 if math.isnan(scores[i]) else -scores[i], i))


def grid_scores(rng, n, special=True):
    """Few distinct values (many ties), signed zeros, and optionally NaN and +-inf."""
    s = rng.integers(-3, 4, size=n).astype(np.float64) / 2
    s[s == 0] = rng.choice([0.0, -0.0], size=int((s == 0).sum()))
    if special:
        for value in (np.nan, np.inf, -np.inf):
            s[rng.random(n) < 0.05] = value
    return s


@pytest.mark.parametrize("seed", range(6))
def test_top_k_indices_matches_a_full_python_sort(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 50, 301):
        scores = grid_scores(rng, n, special=seed % 2 == 0)
        allowed = rng.random(n) < 0.8
        for mask in (None, allowed):
            ref = reference_order(scores.tolist(), mask)
            for k in (None, 0, 1, 3, n // 2, n - 1, n, n + 5):
                got = retrieval.top_k_indices(scores, k, allowed=mask)
                assert got.dtype == np.int64
                assert got.tolist() == (ref if k is None else ref[:max(k, 0)]), (n, k)
        as_float32 = retrieval.top_k_indices(scores.astype(np.float32), 5)
        assert as_float32.tolist() == reference_order(scores.tolist())[:5]
    assert retrieval.top_k_indices(np.array([1, 3, 3, 2]), 3).tolist() == [1, 2, 3]  # ints
    with pytest.raises(ValueError, match="1-D"):
        retrieval.top_k_indices(np.zeros((2, 2)), 1)


def test_top_k_of_scores_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n_q, n = int(rng.integers(1, 6)), int(rng.integers(1, 80))
        scores = np.stack([grid_scores(rng, n) for _ in range(n_q)])
        excluded = [rng.integers(-2, n + 2, size=rng.integers(0, 5)).tolist() for _ in range(n_q)]
        for top_k in (0, 1, 10, n, n + 3):
            got = retrieval.top_k_of_scores(scores, top_k, excluded=excluded)
            k = min(top_k, n)
            assert got.scores.shape == got.indices.shape == (n_q, k)
            assert got.scores.dtype == np.float32 and got.indices.dtype == np.int64
            for q in range(n_q):
                row = scores[q].astype(np.float32).tolist()
                gone = {i for i in excluded[q] if 0 <= i < n}
                # results: finite or +inf scores of non-excluded documents, best first
                ref = [i for i in reference_order(row)
                       if i not in gone and (row[i] > -math.inf)][:k]
                assert got.indices[q].tolist() == ref + [-1] * (k - len(ref))
                assert got.scores[q].tolist() == [row[i] for i in ref] + [-math.inf] * (k - len(ref))
    with pytest.raises(ValueError, match="empty"):
        retrieval.top_k_of_scores(np.zeros((2, 0)), 3)
    with pytest.raises(ValueError, match="rows for"):
        retrieval.top_k_of_scores(np.zeros((2, 3)), 3, excluded=[[1]])
    with pytest.raises(ValueError, match="top_k"):
        retrieval.top_k_of_scores(np.zeros((2, 3)), -1)


def test_search_result_run_drops_non_results():
    result = retrieval.top_k_of_scores(np.array([[0.5, 2.0, -np.inf], [1.0, 1.0, 3.0]]), 3,
                                       excluded=[[], [2]])
    assert result.to_run(["a", "b"], ["x", "y", "z"]) == {"a": {"y": 2.0, "x": 0.5},
                                                           "b": {"x": 1.0, "y": 1.0}}
    with pytest.raises(ValueError, match="query ids"):
        result.to_run(["a"], ["x", "y", "z"])


def test_nv_threshold_and_mask_formulas():
    s_min = np.array([0.8, -0.2, 0.0])
    np.testing.assert_array_equal(retrieval.nv_threshold(s_min, "perc_pos", 0.9, 0.1),
                                  [0.9 * 0.8, 0.9 * -0.2, 0.0])
    np.testing.assert_array_equal(retrieval.nv_threshold(s_min, "margin_pos", 0.9, 0.1),
                                  [0.8 - 0.1, -0.2 - 0.1, -0.1])
    assert retrieval.nv_threshold(0.5, "perc_pos") == 0.95 * 0.5
    assert retrieval.nv_threshold(0.5, "margin_pos") == 0.5 - 0.05
    for method in ("none", "top_k"):
        with pytest.raises(ValueError, match="unknown filter"):
            retrieval.nv_threshold(0.5, method)
    scores = np.array([[0.73, 0.71, np.nan], [-0.17, -0.3, 0.0], [0.0, -0.1, -0.2]])
    keep = retrieval.positive_aware_mask(scores, s_min, "perc_pos", perc=0.9)
    assert keep.tolist() == [[False, True, False], [False, True, False], [False, True, True]]
    assert retrieval.positive_aware_mask(scores, s_min, "none").all()
    with pytest.raises(ValueError, match="expected scores"):
        retrieval.positive_aware_mask(scores, s_min[:2])


def test_rank_candidates_against_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(30):
        n_q, n = int(rng.integers(1, 5)), int(rng.integers(4, 40))
        scores = np.stack([grid_scores(rng, n) for _ in range(n_q)])
        positives = [rng.choice(n, size=rng.integers(1, 3), replace=False).tolist()
                     for _ in range(n_q)]
        excluded = [rng.choice(n, size=rng.integers(0, 4), replace=False).tolist()
                    for _ in range(n_q)]
        depth = int(rng.integers(1, n + 3))
        ids, cand, s_min = retrieval.rank_candidates(scores, positives, depth, excluded)
        for q in range(n_q):
            row = scores[q].tolist()
            pos = [row[p] for p in positives[q]]
            if any(math.isnan(v) for v in pos):
                assert math.isnan(s_min[q])
            else:
                assert s_min[q] == min(pos)
            gone = set(positives[q]) | set(excluded[q])
            top = [i for i in reference_order(row) if i not in gone][:depth]
            ref = [i for i in top if math.isfinite(row[i])]
            assert ids[q].tolist() == ref + [-1] * (depth - len(ref))
            assert cand[q].tolist() == [row[i] for i in ref] + [-math.inf] * (depth - len(ref))
    with pytest.raises(ValueError, match="no positive"):
        retrieval.rank_candidates(np.zeros((1, 3)), [[]], 2)


def test_draw_and_select_negatives():
    ranked = np.array([7, 3, 9, 1, 4, 8])
    assert retrieval.draw_negatives(ranked, 2).tolist() == [7, 3]
    assert retrieval.draw_negatives(ranked, 4, sample_from_top=3).tolist() == [7, 3, 9, 1]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        got = retrieval.draw_negatives(ranked, 2, sample_from_top=4, rng=rng).tolist()
        assert len(got) == 2 and set(got) <= {7, 3, 9, 1}
        assert got == sorted(got, key=ranked.tolist().index)  # rank order kept
        seen.add(tuple(got))
    assert len(seen) == 6  # every pair of the top 4 comes up
    assert retrieval.draw_negatives(ranked[:1], 2, sample_from_top=5, rng=rng).tolist() == [7]
    with pytest.raises(ValueError, match="rng"):
        retrieval.draw_negatives(ranked, 2, sample_from_top=4)
    ids = np.array([[5, 2, -1], [4, 0, 1]])
    keep = np.array([[True, True, True], [False, True, True]])
    assert [c.tolist() for c in retrieval.select_negatives(ids, keep, 5)] == [[5, 2], [0, 1]]


def test_bm25_scores_are_the_index_scores_and_empty_queries_score_zero():
    corpus = ["the cat sat on the mat", "dogs chase cats", "markets fell"]
    got = retrieval.bm25_scores(["cats and dogs", "the of and"], corpus)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, retrieval.BM25Index(corpus).scores(
        ["cats and dogs", "the of and"]))
    assert got[1].tolist() == [0.0, 0.0, 0.0]  # stop words only
    assert got[0, 1] > got[0, 0] > 0 and got[0, 2] == 0
    assert retrieval.BM25Index(corpus, language=None).tokenize(["Cats running"]) == [
        ["cats", "running"]]


def test_imports_without_jax_as_the_synthesis_environment_does():
    """The synthesis package runs where JAX is not installed: importing the toolbox and the
    stages that use it must not import jax, flax, grain or torch."""
    code = (
        "import sys\n"
        "for name in ('jax', 'jaxlib', 'flax', 'grain', 'torch', 'optax', 'orbax'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "import numpy as np\n"
        "from reasonembed_jax import retrieval\n"
        "from remixer import config, stages\n"
        "assert stages.retrieval is retrieval\n"
        "assert retrieval.top_k_indices(np.array([0.1, 0.3]), 1).tolist() == [1]\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "synthesis")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
