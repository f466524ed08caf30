"""Positive-aware negative mining and the record-building tools."""

import filecmp
import gzip
import json
import os

import numpy as np
import pytest

from reasonembed_jax import retrieval
from reasonembed_jax.data import build_records
from reasonembed_jax.data.pipeline import DEMO_DATA_DIR
from reasonembed_jax.records import validate_record


def reference_keep(scores, s_min, method, perc=0.95, margin=0.05):
    """Element by element, straight from NV-Retriever's definitions."""
    out = np.zeros(scores.shape, dtype=bool)
    for q in range(scores.shape[0]):
        for k in range(scores.shape[1]):
            if method == "perc_pos":
                out[q, k] = scores[q, k] < perc * s_min[q]
            elif method == "margin_pos":
                out[q, k] = scores[q, k] < s_min[q] - margin
            else:
                out[q, k] = True
    return out


@pytest.mark.parametrize("method", retrieval.FILTERS)
def test_positive_aware_mask_matches_reference(method):
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.2, 0.9, size=(30, 40))
    s_min = rng.uniform(0.4, 0.9, size=30)
    # Values right at the thresholds must be dropped (strict inequality).
    scores[0, 0] = 0.95 * s_min[0]
    scores[1, 0] = s_min[1] - 0.05
    got = retrieval.positive_aware_mask(scores, s_min, method)
    np.testing.assert_array_equal(got, reference_keep(scores, s_min, method))
    if method != "none":
        assert not got[0, 0] or method == "margin_pos"
        assert not got[1, 0] or method == "perc_pos"
    got = retrieval.positive_aware_mask(scores, s_min, method, perc=0.8, margin=0.2)
    np.testing.assert_array_equal(got, reference_keep(scores, s_min, method, 0.8, 0.2))
    with pytest.raises(ValueError):
        retrieval.positive_aware_mask(scores, s_min, "top_k")


def test_rank_candidates_and_selection():
    scores = np.array([[0.9, 0.1, 0.8, 0.7, 0.85, 0.3],
                       [0.2, 0.6, 0.6, 0.9, 0.1, 0.5]])
    positives = [[0, 3], [3]]
    ids, cand, s_min = retrieval.rank_candidates(scores, positives, depth=5, excluded=[[], [5]])
    np.testing.assert_array_equal(s_min, [0.7, 0.9])
    # Positives and excluded ids removed, descending score, ties by id, padded with -1.
    assert ids[0].tolist() == [4, 2, 5, 1, -1]
    assert ids[1].tolist() == [1, 2, 0, 4, -1]
    keep = retrieval.positive_aware_mask(cand, s_min, "perc_pos")
    chosen = retrieval.select_negatives(ids, keep, 2)
    # 0.95 * 0.7 = 0.665: 4 (0.85) and 2 (0.8) are too close to the positive.
    assert chosen[0].tolist() == [5, 1]
    assert chosen[1].tolist() == [1, 2]
    sampled = retrieval.select_negatives(ids, keep, 1, sample_from_top=3,
                                         rng=np.random.default_rng(0))
    assert sampled[1].tolist()[0] in (1, 2, 0)


class FakeEmbedder:
    """Deterministic unit vectors from a hash of the words: similar texts, similar vectors."""

    cache_key = "fake"

    def encode(self, texts, instruction=None, batch_size=32, **kwargs):
        out = []
        for text in texts:
            vec = np.zeros(64)
            for word in text.lower().split():
                vec[sum(map(ord, word)) % 64] += 1.0
            out.append(vec / max(np.linalg.norm(vec), 1e-9))
        return np.asarray(out, dtype=np.float32)


@pytest.fixture()
def tiny_beir(tmp_path):
    words = ["apple", "banana", "cherry", "grape", "lemon", "mango", "olive", "peach"]
    corpus = [{"_id": f"d{i}", "title": words[i % 8],
               "text": f"{words[i % 8]} {words[(i * 3) % 8]} {words[(i * 5) % 8]} fruit"}
              for i in range(24)]
    queries = [{"_id": f"q{i}", "text": f"{words[i % 8]} {words[(i * 3) % 8]}"}
               for i in range(6)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in corpus))
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (tmp_path / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(6)]
    rows += ["q0\td8\t1", "q5\tmissing\t1", "q9\td1\t1"]
    (tmp_path / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_beir_records_with_embedder_respect_the_filter(tiny_beir):
    queries, corpus, qrels = build_records.load_beir(str(tiny_beir), "train")
    records, skipped = build_records.build_beir_records(
        queries, corpus, qrels, domain="fruit", instruction="Find fruit", negatives="embedder",
        embedder=FakeEmbedder(), num_negatives=4, depth=20, filter_name="perc_pos", perc=0.95,
        margin=0.05, sample_from_top=None, max_chars=None, seed=0)
    assert skipped == {"unknown_query": 1, "no_positive_in_corpus": 0,
                       "no_negative_after_filter": 0}
    assert len(records) == 6
    emb = FakeEmbedder()
    for rec in records:
        validate_record(rec)
        q = emb.encode([rec["query"]])[0]
        pos_scores = emb.encode(rec["pos"]) @ q
        neg_scores = emb.encode(rec["neg"]) @ q
        np.testing.assert_allclose(rec["pos_scores"], pos_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["neg_scores"], neg_scores, rtol=1e-5, atol=1e-6)
        assert np.all(neg_scores < 0.95 * pos_scores.min() + 1e-6)
        assert not set(rec["neg"]) & set(rec["pos"])
        assert list(neg_scores) == sorted(neg_scores, reverse=True)
    q0 = next(r for r in records if r["id"] == "fruit-q0")
    assert len(q0["pos"]) == 2


def test_beir_cli_on_scifact_with_bm25(shared_data, tmp_path):
    out = tmp_path / "scifact.jsonl.gz"
    code = build_records.main(["beir", "--dataset-dir", str(shared_data / "beir_scifact"),
                               "--domain", "scifact", "--out", str(out), "--num-negatives", "4",
                               "--depth", "30", "--filter", "margin_pos", "--margin", "1.0"])
    assert code == 0
    with gzip.open(out, "rt") as f:
        records = [json.loads(line) for line in f]
    assert 600 < len(records) <= 809  # 809 train queries; some lose every candidate
    for rec in records:
        validate_record(rec)
        assert max(rec["neg_scores"]) < min(rec["pos_scores"]) - 1.0


def test_bright_records_use_other_queries_gold_answers(shared_data):
    examples = build_records.read_jsonl(str(shared_data / "bright/examples/biology.jsonl.gz"))
    answers = {ex["id"]: ex["gold_answer"][:800] for ex in examples}
    records, skipped = build_records.build_bright_records(
        examples, "biology", num_negatives=5, max_queries=20, max_chars=800,
        filter_name="perc_pos", perc=0.95, margin=0.05, reasoning_mode="query+reasoning",
        instruction="Given a Biology post, retrieve relevant passages", seed=1)
    assert len(records) == 20 and skipped["no_gold_answer"] == 0
    by_id = {ex["id"]: ex for ex in examples}
    for rec in records:
        validate_record(rec, require_reasoning_query=True)
        ex = by_id[rec["id"].removeprefix("bright-biology-")]
        assert rec["pos"] == [answers[ex["id"]]]
        assert rec["reasoning_query"] == ex["query"].strip() + "\n" + ex["reasoning"].strip()
        others = {t for i, t in answers.items() if t != answers[ex["id"]]}
        assert set(rec["neg"]) <= others and len(rec["neg"]) == 5
        assert max(rec["neg_scores"]) < 0.95 * rec["pos_scores"][0]
    # Tasks without gold answers give nothing.
    pony = build_records.read_jsonl(str(shared_data / "bright/examples/pony.jsonl.gz"))
    none, skipped = build_records.build_bright_records(
        pony, "pony", num_negatives=5, max_queries=None, max_chars=None, filter_name="none",
        perc=0.95, margin=0.05, reasoning_mode="reasoning", instruction="x", seed=0)
    assert none == [] and skipped["no_gold_answer"] == len(pony)


def test_shipped_demo_data_is_what_the_documented_command_builds(shared_data, tmp_path):
    code = build_records.main(["bright", "--bright-dir", str(shared_data / "bright"),
                               "--out-dir", str(tmp_path), "--max-queries", "48",
                               "--num-negatives", "7", "--max-chars", "1500"])
    assert code == 0
    built = sorted(f for f in os.listdir(tmp_path) if f.endswith(".jsonl.gz"))
    shipped = sorted(f for f in os.listdir(DEMO_DATA_DIR) if f.endswith(".jsonl.gz"))
    assert built == shipped and len(shipped) == 7
    for name in built:
        assert filecmp.cmp(tmp_path / name, os.path.join(DEMO_DATA_DIR, name), shallow=False)


@pytest.mark.parametrize("argv", [["--help"], ["bright", "--help"], ["beir", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_records.main(argv)
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_tfds_builder_cli_help(capsys):
    from reasonembed_jax.data.tfds_builder import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "array_record" in capsys.readouterr().out


def test_beir_cli_with_the_real_text_encoder(tiny_beir, hf_configs_dir, qwen3_tokenizer_dir,
                                             tmp_path):
    """`--negatives embedder --embedder DIR` end to end with a tiny random Qwen3 (TextEncoder)."""
    pytest.importorskip("torch")
    encode = pytest.importorskip("reasonembed_jax.encode")
    import shutil

    from hf_models import build_hf_model, save_hf_model, tiny_hf_config

    model_dir = tmp_path / "tiny_qwen3"
    save_hf_model(build_hf_model(tiny_hf_config(hf_configs_dir, "qwen3")), model_dir)
    for name in os.listdir(qwen3_tokenizer_dir):
        shutil.copy(qwen3_tokenizer_dir / name, model_dir / name)
    out = tmp_path / "fruit.jsonl"
    code = build_records.main(["beir", "--dataset-dir", str(tiny_beir), "--domain", "fruit",
                               "--out", str(out), "--negatives", "embedder", "--embedder",
                               str(model_dir), "--embedder-max-length", "32",
                               "--num-negatives", "3", "--instruction", "Find fruit"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    enc = encode.TextEncoder.from_pretrained(model_dir, max_length=32)
    for rec in records:
        q = enc.encode([rec["query"]], instruction="Find fruit", progress=False)[0]
        negs = enc.encode(rec["neg"], progress=False) @ q
        pos = enc.encode(rec["pos"], progress=False) @ q
        np.testing.assert_allclose(rec["neg_scores"], negs, atol=1e-4)
        assert np.all(negs < 0.95 * pos.min() + 1e-4)
