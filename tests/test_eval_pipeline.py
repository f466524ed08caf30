"""Dense pipeline with a fake encoder: embedding cache reuse, agreement with an independent
numpy + pytrec_eval evaluation, the trainer hook, the workdir contract and the CLI."""

import hashlib
import json
import pathlib
import re

import numpy as np
import pytest

pytrec_eval = pytest.importorskip("pytrec_eval")

from reasonembed_jax import evaluate as cli  # noqa: E402
from reasonembed_jax.evaluation.datasets import RetrievalTask, load_data  # noqa: E402
from reasonembed_jax.evaluation.pipeline import (  # noqa: E402
    DenseRetriever,
    evaluate_during_training,
    evaluate_tasks,
    resolve_model_dir,
)
from reasonembed_jax.text import format_query  # noqa: E402

MINI = pathlib.Path(__file__).parent / "data" / "eval_bright_mini"


class CountingEncoder:
    """Hashed bag-of-words counts (integer-valued, so dot products are exact); records calls."""

    def __init__(self, dim=64, key="fake-v1"):
        self.dim, self.cache_key = dim, key
        self.calls: list[tuple[int, str | None]] = []

    def embed(self, text):
        v = np.zeros(self.dim, np.float32)
        for word in re.findall(r"\w+", text.lower()):
            v[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1
        return v

    def encode(self, texts, instruction=None, batch_size=32, max_length=None, progress=True):
        self.calls.append((len(texts), instruction))
        return np.stack([self.embed(format_query(t, instruction)) for t in texts])

    def corpus_texts_encoded(self):
        return sum(n for n, instruction in self.calls if instruction is None)


def tasks():
    return load_data(f"bright:{MINI}:biology,leetcode")


def reference_metrics(task: RetrievalTask, encoder: CountingEncoder):
    """Full numpy score matrix, excluded ids popped from each query's full list, pytrec_eval."""
    docs = np.stack([encoder.embed(t) for t in task.corpus_texts])
    queries = np.stack([encoder.embed(format_query(t, task.instruction))
                        for t in task.query_texts])
    scores = queries @ docs.T
    run = {}
    for qid, row in zip(task.query_ids, scores, strict=True):
        full = {d: float(s) for d, s in zip(task.corpus_ids, row, strict=True)}
        for d in task.excluded.get(qid, []):
            full.pop(d, None)
        run[qid] = full
    per_query = pytrec_eval.RelevanceEvaluator(
        task.qrels, {"ndcg_cut.10", "recall.10,100"}).evaluate(run)
    return {name: float(np.mean([m[key] for m in per_query.values()]))
            for name, key in (("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"),
                              ("recall@100", "recall_100"))}


def test_dense_pipeline_matches_independent_evaluation():
    encoder = CountingEncoder()
    loaded = tasks()
    results = evaluate_tasks(loaded, DenseRetriever(encoder, corpus_chunk_size=8), top_k=1000)
    for task in loaded:
        ref = reference_metrics(task, encoder)
        for name, value in ref.items():
            assert results["tasks"][task.name][name] == pytest.approx(value, abs=1e-12)
    assert results["average"]["ndcg@10"] == pytest.approx(
        np.mean([results["tasks"][t.name]["ndcg@10"] for t in loaded]))
    # queries carry the task instruction, documents none
    assert ("Given a Coding problem" in "".join(str(i) for _, i in encoder.calls))


def test_embedding_cache_second_run_skips_corpus_encoding(tmp_path, capsys):
    encoder = CountingEncoder()
    first = evaluate_tasks(tasks(), DenseRetriever(encoder, cache_dir=tmp_path), top_k=100)
    encoded_first = encoder.corpus_texts_encoded()
    assert encoded_first == sum(len(t.corpus_ids) for t in tasks())
    out = capsys.readouterr().out
    assert "cached at" in out and "loaded" not in out

    second = evaluate_tasks(tasks(), DenseRetriever(encoder, cache_dir=tmp_path), top_k=100)
    assert encoder.corpus_texts_encoded() == encoded_first  # no corpus text encoded again
    out = capsys.readouterr().out
    assert re.search(r"loaded \d+ document embeddings from cache .* in \d+\.\d+ s", out)
    assert all(second["tasks"][n]["timings"]["corpus_cache_hit"] for n in second["tasks"])
    assert not any(first["tasks"][n]["timings"]["corpus_cache_hit"] for n in first["tasks"])
    for name in first["tasks"]:
        assert first["tasks"][name]["ndcg@10"] == second["tasks"][name]["ndcg@10"]

    # a different model key or a changed document misses the cache
    other = CountingEncoder(key="fake-v2")
    evaluate_tasks(tasks()[:1], DenseRetriever(other, cache_dir=tmp_path), top_k=10)
    assert other.corpus_texts_encoded() == len(tasks()[0].corpus_ids)
    edited = tasks()[:1]
    edited[0].corpus_texts[0] += " edited"
    evaluate_tasks(edited, DenseRetriever(encoder, cache_dir=tmp_path), top_k=10)
    assert encoder.corpus_texts_encoded() == encoded_first + len(edited[0].corpus_ids)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 4


def test_evaluate_during_training_uses_the_cli_path():
    encoder = CountingEncoder()
    spec = f"bright:{MINI}:biology,leetcode"
    flat = evaluate_during_training(encoder, spec, top_k=1000)
    direct = evaluate_tasks(tasks(), DenseRetriever(CountingEncoder()), top_k=1000)
    assert flat["eval/biology/ndcg@10"] == direct["tasks"]["biology"]["ndcg@10"]
    assert flat["eval/average/recall@100"] == direct["average"]["recall@100"]
    assert set(flat) == {f"eval/{t}/{m}" for t in ("biology", "leetcode", "average")
                         for m in ("ndcg@10", "recall@10", "recall@100", "mrr@10")}
    assert all(isinstance(v, float) for v in flat.values())


def test_resolve_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="export/latest"):
        resolve_model_dir(tmp_path)
    latest = tmp_path / "export" / "step_10"
    latest.mkdir(parents=True)
    (tmp_path / "export" / "latest").symlink_to("step_10")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_dir(tmp_path)
    (latest / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        resolve_model_dir(tmp_path)
    (latest / "model.safetensors").write_bytes(b"")
    assert resolve_model_dir(tmp_path) == latest.resolve()


def test_cli_bm25_on_bright_layout(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["--model", "bm25", "--data", f"bright:{MINI}:biology,earth-science,leetcode",
                     "--top-k", "100", "--out", str(out), "--run-dir", str(tmp_path / "runs")]) == 0
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"biology", "earth_science", "leetcode"}
    assert results["average"]["ndcg@10"] == pytest.approx(
        np.mean([results["tasks"][t]["ndcg@10"] for t in results["tasks"]]))
    printed = capsys.readouterr().out
    assert re.search(r"^average\s+\d+\.\d\d", printed, re.M)

    # leetcode: each query's own text sits in the corpus under an excluded id; BM25 ranks it
    # first unless the exclusion is applied before the top-k.
    run_lines = (tmp_path / "runs" / "leetcode.run").read_text().splitlines()
    leet = load_data(f"bright:{MINI}:leetcode")[0]
    for line in run_lines:
        qid, _, doc_id, *_ = line.split()
        assert doc_id not in leet.excluded[qid]
    from reasonembed_jax.evaluation.bm25 import BM25Retriever

    leet.excluded = {}
    result, _ = BM25Retriever(log=lambda m: None).search(leet, 5)
    run = result.to_run(leet.query_ids, leet.corpus_ids)
    original = load_data(f"bright:{MINI}:leetcode")[0]
    for qid, docs in run.items():
        assert max(docs, key=docs.get) in original.excluded[qid][:2]


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--data", f"bright:{MINI}:biology", "--out", str(tmp_path / "x.json")])
    with pytest.raises(FileNotFoundError, match="export/latest"):
        cli.main(["--workdir", str(tmp_path), "--data", f"bright:{MINI}:biology",
                  "--out", str(tmp_path / "x.json")])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "--query-field" in capsys.readouterr().out
