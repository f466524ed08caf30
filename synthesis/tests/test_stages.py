"""Every stage's logic with the scripted backend and a bag-of-words embedder."""

from __future__ import annotations

import gzip
import json
import pathlib
import re
from collections import Counter

import numpy as np
import pytest
from conftest import bag_of_words_embed

from reasonembed_jax.records import parse_record_line
from remixer import prompts as P
from remixer import stages as S
from remixer.backends import Generation, ScriptedBackend
from remixer.config import load_config
from remixer.store import StageError, read_jsonl

TOPICS = ["photosynthesis chlorophyll light", "mitochondria respiration energy",
          "neurons synapse signal", "enzymes catalysis substrate"]


def make_corpus(path: pathlib.Path, n: int = 24, extra: list[dict] | None = None) -> list[dict]:
    docs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        body = f"Document d{i} explains {topic}. " + " ".join(
            f"{topic.split()[j % 3]} detail{i}x{j}" for j in range(30))
        docs.append({"_id": f"d{i}", "title": f"Title {i}", "text": body})
    docs[0]["text"] = "too short"
    docs[1]["text"] = "long " * 1200
    docs += extra or []
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def between(prompt: str) -> list[str]:
    return re.findall(r"<<<\n(.*?)\n>>>", prompt, re.DOTALL)


class Responder:
    """Answers each prompt type deterministically; hooks let a test inject failures."""

    def __init__(self, query_for=None, score_for=None, reason_for=None):
        self.calls: Counter = Counter()
        self.query_for = query_for or (lambda src: "Why does " + " ".join(src.split()[:12]) + "?")
        self.score_for = score_for or self.default_score
        self.reason_for = reason_for or (lambda q: f"<think>scratch</think>It needs: {q[:40]}")

    @staticmethod
    def default_score(query: str, doc: str):
        topic_q = next(t for t in TOPICS if t.split()[0] in query)
        if "d2 " in doc or doc.startswith("Title 2\n"):
            return "no tag here"  # always unparsable
        return f"analysis...\n<score>{5 if topic_q.split()[0] in doc else 1}</score>"

    def __call__(self, prompt: str):
        if "Reply with a single word" in prompt:
            self.calls["filter"] += 1
            return "Yes" if "neurons" not in prompt else "No"
        if "You create realistic search requests" in prompt:
            self.calls["query"] += 1
            return self.query_for(between(prompt)[0])
        if "You judge how useful" in prompt:
            self.calls["judge"] += 1
            query, doc = between(prompt)
            return self.score_for(query, doc)
        if "think it\nthrough" in prompt:
            self.calls["reason"] += 1
            return self.reason_for(between(prompt)[0])
        raise AssertionError(f"unexpected prompt: {prompt[:80]}")


def make_ctx(tmp_path: pathlib.Path, backend, overrides=(), domain="biology") -> S.Context:
    cfg = load_config(None, [f"data.corpus={json.dumps(str(tmp_path / 'corpus.jsonl'))}",
                             "mining.top_k=5", "shard_size=4", *overrides])
    return S.Context(config=cfg, work_dir=tmp_path / "work", domain=P.load_domain(domain),
                     backends=S.BackendPool(cfg["models"], factory=lambda _cfg: backend),
                     log=lambda _msg: None)


def scripted(responder=None) -> ScriptedBackend:
    return ScriptedBackend(responder or Responder(), bag_of_words_embed)


# ----------------------------------------------------------------------------- stage 1


def test_sources_exclude_benchmark_gold_and_respect_bounds(tmp_path, shared_data):
    bright = shared_data / "bright" / "examples" / "biology.jsonl.gz"
    with gzip.open(bright, "rt") as f:
        first = json.loads(f.readline())
    gold_id, gold_long = first["gold_ids"][0], first["gold_ids_long"][0]
    leaked = [
        {"id": gold_id, "text": "A gold passage for a BRIGHT test query. " * 10},
        {"id": gold_long, "text": "The long form of that gold document. " * 10},
        {"id": "copy-of-gold-answer", "text": first["gold_answer"]},
    ]
    make_corpus(tmp_path / "corpus.jsonl", extra=leaked)
    ctx = make_ctx(tmp_path, scripted(),
                   [f"data.exclude_ids={json.dumps([str(bright)])}",
                    f"data.exclude_texts={json.dumps([str(bright)])}"])
    summary = S.run_sources(ctx)
    chosen = list(read_jsonl(ctx.final_path("sources")))
    ids = {d["id"] for d in chosen}
    assert not ids & {gold_id, gold_long, "copy-of-gold-answer"}
    assert "d0" not in ids and "d1" not in ids  # 9 chars < 200; 6000 chars > 5000
    assert summary["excluded_gold_id"] == 2 and summary["excluded_gold_text"] == 1
    assert summary["too_short"] == 1 and summary["too_long"] == 1
    assert summary["selected"] == 22 == len(chosen)
    assert all(200 <= len(d["text"]) <= 5000 for d in chosen)
    assert chosen[0]["text"].startswith("Title 2\n")  # title prepended


def test_sources_sample_size_is_seeded_and_uniform(tmp_path):
    docs = [{"id": f"d{i}", "text": "x" * 300 + str(i)} for i in range(50)]
    a, stats = S.select_sources(docs, set(), set(), 200, 5000, 10, seed=1)
    b, _ = S.select_sources(docs, set(), set(), 200, 5000, 10, seed=1)
    c, _ = S.select_sources(docs, set(), set(), 200, 5000, 10, seed=2)
    assert a == b and a != c and len(a) == 10 and stats["eligible"] == 50
    assert [d["id"] for d in a] == sorted((d["id"] for d in a), key=lambda s: int(s[1:]))
    dup, stats = S.select_sources(docs + [{"id": "z", "text": docs[0]["text"].upper()}], set(),
                                  set(), 200, 5000, 100, seed=0)
    assert stats["duplicate_text"] == 1 and len(dup) == 50
    # every eligible document is picked about equally often over many seeds
    counts = Counter(d["id"] for s in range(400)
                     for d in S.select_sources(docs, set(), set(), 200, 5000, 10, s)[0])
    assert min(counts.values()) > 40 and max(counts.values()) < 125  # mean 80


def test_exclusions_cli_writes_bright_gold_ids(tmp_path, shared_data):
    from remixer.cli import main

    bright = shared_data / "bright" / "examples" / "biology.jsonl.gz"
    out = tmp_path / "gold.txt"
    assert main(["exclusions", str(bright), "--out", str(out)]) == 0
    ids = set(out.read_text().split())
    expected = set()
    with gzip.open(bright, "rt") as f:
        for line in f:
            obj = json.loads(line)
            expected.update(obj["gold_ids"] + obj["gold_ids_long"])
    assert ids == expected and len(ids) > 100


# ----------------------------------------------------------------------------- stage 0 and 2


def test_filter_keeps_yes_answers(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")
    backend = scripted()
    ctx = make_ctx(tmp_path, backend, ["filter.enabled=true"])
    summary = S.run_filter(ctx)
    kept = list(read_jsonl(ctx.final_path("filter")))
    assert all("neurons" not in d["text"] for d in kept)
    assert summary["answered_no"] == 6 and summary["answered_yes"] == 18 == len(kept)
    assert [len(b) for b in backend.generate_batches] == [4] * 6  # one batch per shard
    S.run_sources(ctx)  # the sources now come from the filtered corpus
    assert all("neurons" not in d["text"] for d in read_jsonl(ctx.final_path("sources")))


def test_queries_retry_count_failures_and_drop_duplicates(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")
    attempts: Counter = Counter()

    def query_for(src: str):
        doc = re.search(r"Document (d\d+)", src).group(1)
        attempts[doc] += 1
        if doc == "d2" and attempts[doc] == 1:
            return '```\n""\n```'  # empty after cleaning: a parse failure, retried
        if doc == "d3":
            return RuntimeError("server said no")  # fails on every attempt
        if doc in ("d4", "d5"):
            return '"Same question for both?"'
        return f"Query: what is going on in {doc} with {src.split()[3]}?"

    backend = scripted(Responder(query_for=query_for))
    ctx = make_ctx(tmp_path, backend)
    S.run_sources(ctx)  # all 22 eligible sources, 6 shards of <= 4
    summary = S.run_queries(ctx)
    queries = list(read_jsonl(ctx.final_path("queries")))
    by_source = {q["source_id"]: q for q in queries}
    assert "d3" not in by_source and attempts["d3"] == 3  # max_attempts
    assert by_source["d2"]["query"].startswith("what is going on in d2")
    assert ("d4" in by_source) != ("d5" in by_source)  # one duplicate dropped
    assert summary["dropped_duplicate_query"] == 1
    assert summary["dropped_no_valid_query"] == 1
    assert summary["llm_request_errors"] == 3 and summary["llm_parse_failures"] == 1
    assert summary["items_in"] == 22 and summary["records_final"] == 20
    # each shard's prompts went out as one batch; then one retry batch for the failures
    assert [len(b) for b in backend.generate_batches] == [4, 2, 1, 4, 4, 4, 4, 2]
    # the conditions in the prompt are the ones recorded, and a pure function of the source id
    cfg = ctx.config["queries"]
    for q in queries:
        assert (q["length"], q["education"]) == S.query_conditions(0, q["source_id"], cfg)
    prompt = next(p for b in backend.generate_batches for p in b if "d6 explains" in p)
    q6 = by_source["d6"]
    assert f"Length: {q6['length']}." in prompt and f"a {q6['education']} education" in prompt


# ----------------------------------------------------------------------------- stage 3


def test_candidates_exclude_source_and_identical_texts(tmp_path):
    docs = make_corpus(tmp_path / "corpus.jsonl")
    # the query is the source's text verbatim, so the source would be the best match
    copy_text = "Title 7\n" + docs[7]["text"]
    docs_extra = [{"_id": "clone", "text": copy_text[len("Title 7\n"):], "title": "Title 7"}]
    make_corpus(tmp_path / "corpus.jsonl", extra=docs_extra)
    backend = scripted(Responder(query_for=lambda src: src))
    ctx = make_ctx(tmp_path, backend, ["sources.sample_size=30"])
    S.run_sources(ctx)
    # the clone has the same text as d7, so the source stage drops it as a duplicate
    S.run_queries(ctx)
    summary = S.run_candidates(ctx)
    mined = {q["source_id"]: q for q in read_jsonl(ctx.final_path("candidates"))}
    corpus = S.load_corpus(tmp_path / "corpus.jsonl")
    emb = bag_of_words_embed([d["text"] for d in corpus])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for source_id, q in mined.items():
        ids = [c["doc_id"] for c in q["candidates"]]
        assert source_id not in ids
        if source_id == "d7":
            assert "clone" not in ids  # same text as the query
        # independent reference: brute-force cosine over the allowed documents
        qv = bag_of_words_embed([f"Instruct: {ctx.domain.instruction}\nQuery: {q['query']}"])[0]
        qv /= np.linalg.norm(qv)
        scores = emb @ qv
        allowed = [i for i, d in enumerate(corpus)
                   if d["id"] != source_id and d["text"] != q["query"]]
        ref = sorted(allowed, key=lambda i: -scores[i])[:5]
        # same scores in the same order; ids equal up to ties (the clone has d7's text)
        np.testing.assert_allclose([c["score"] for c in q["candidates"]], scores[ref],
                                   atol=1e-5)
        position = {d["id"]: i for i, d in enumerate(corpus)}
        for doc_id, ref_row in zip(ids, ref, strict=True):
            assert position[doc_id] in allowed
            assert abs(scores[position[doc_id]] - scores[ref_row]) < 1e-5
    assert summary["excluded_source"] == len(mined)
    assert summary["excluded_identical_text"] >= 1
    assert summary["candidates"] == 5 * len(mined) and summary["candidates_padded"] == 0
    # the corpus is embedded once, then each shard's queries in one call
    assert len(backend.embed_batches[0]) == len(corpus)
    shard_sizes = [min(4, len(mined) - lo) for lo in range(0, len(mined), 4)]
    assert [len(b) for b in backend.embed_batches[1:]] == shard_sizes
    assert (tmp_path / "work" / "candidates" / "corpus_embeddings" / "chunk-00000.npy").exists()


def test_candidates_exclude_copies_of_the_source_text(tmp_path):
    """A copy of the source text under another id (different case and spacing) is as trivial a
    positive as the source itself: mining must never return it."""
    docs = make_corpus(tmp_path / "corpus.jsonl")
    planted = {"_id": "planted-copy", "title": "TITLE 7",
               "text": "  " + docs[7]["text"].upper().replace(" ", "   ") + "\n"}
    make_corpus(tmp_path / "corpus.jsonl", extra=[planted])
    backend = scripted()  # queries: "Why does <first 12 words of the source>?"
    ctx = make_ctx(tmp_path, backend, ["sources.sample_size=30"])
    S.run_sources(ctx)  # the planted copy is a duplicate text there, so d7 stays the source
    S.run_queries(ctx)
    summary = S.run_candidates(ctx)
    mined = {q["source_id"]: q for q in read_jsonl(ctx.final_path("candidates"))}
    corpus = {d["id"]: d["text"] for d in S.load_corpus(tmp_path / "corpus.jsonl")}
    assert P.normalize_for_dedup(corpus["planted-copy"]) == P.normalize_for_dedup(corpus["d7"])
    assert "d7" in mined and mined["d7"]["query"] != corpus["d7"]
    # without the exclusion the copy is the best match (its embedding equals the source's)
    emb = bag_of_words_embed([corpus["d7"], corpus["planted-copy"], mined["d7"]["query"]])
    assert np.allclose(emb[0], emb[1])
    for source_id, q in mined.items():
        source_key = P.normalize_for_dedup(corpus[source_id])
        assert all(P.normalize_for_dedup(c["text"]) != source_key for c in q["candidates"])
        assert source_id not in [c["doc_id"] for c in q["candidates"]]
    assert "planted-copy" not in [c["doc_id"] for c in mined["d7"]["candidates"]]
    assert len(mined["d7"]["candidates"]) == 5
    assert summary["excluded_source_text_copies"] == 1


class EmbedCrash(Exception):
    pass


def test_corpus_embedding_resumes_by_chunk(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")  # 24 documents -> chunks of 5: 5 chunks
    calls: list[list[str]] = []
    crash = {"on_call": 3}

    def flaky_embed(texts):
        calls.append(list(texts))
        if len(calls) == crash["on_call"]:
            raise EmbedCrash("killed while embedding the third chunk")
        return bag_of_words_embed(texts)

    overrides = ["mining.corpus_chunk_size=5", "sources.sample_size=4"]
    backend = ScriptedBackend(Responder(), flaky_embed)
    ctx = make_ctx(tmp_path, backend, overrides)
    S.run_sources(ctx)
    S.run_queries(ctx)
    with pytest.raises(EmbedCrash):
        S.run_candidates(ctx)
    chunks = sorted(p.name for p in (ctx.stage_dir("candidates") / "corpus_embeddings")
                    .glob("chunk-*.npy"))
    assert chunks == ["chunk-00000.npy", "chunk-00001.npy"]
    calls.clear()
    crash["on_call"] = -1
    resumed = make_ctx(tmp_path, ScriptedBackend(Responder(), flaky_embed), overrides)
    S.run_candidates(resumed)
    corpus = S.load_corpus(tmp_path / "corpus.jsonl")
    # only chunks 2-4 (documents 10..23) were embedded again, then the 4 queries
    assert calls[:3] == [[d["text"] for d in corpus[lo: lo + 5]] for lo in (10, 15, 20)]
    assert len(calls) == 4 and len(calls[3]) == 4
    mined = list(read_jsonl(resumed.final_path("candidates")))
    assert len(mined) == 4 and all(len(q["candidates"]) == 5 for q in mined)


def test_top_k_pads_with_random_documents_when_too_few_pass():
    rng = np.random.default_rng(0)
    corpus = np.eye(6, dtype=np.float32)
    q = np.array([0.9, 0.1, 0, 0, 0, 0], np.float32)
    usable = np.ones(6, bool)
    picked = S.top_k_candidates(corpus @ q, [0], usable, 4, 0.05, True, rng)
    assert picked[0] == (1, pytest.approx(0.1), False)  # only row 1 passes min_score
    assert [p for _, _, p in picked] == [False, True, True, True]
    assert len({i for i, _, _ in picked}) == 4 and 0 not in {i for i, _, _ in picked}
    unpadded = S.top_k_candidates(corpus @ q, [0], usable, 4, 0.05, False, rng)
    assert [i for i, _, _ in unpadded] == [1]
    usable[1] = False
    assert 1 not in [i for i, _, _ in S.top_k_candidates(corpus @ q, [], usable, 6, None,
                                                          True, rng)]


# ----------------------------------------------------------------------------- stages 4-6 + NV


def test_split_thresholds():
    cands = [{"text": t, "label": s} for t, s in
             [("a", 5), ("b", 3), ("c", 2), ("d", 1), ("e", -1), ("A", 1), ("f", 4), ("g", 0)]]
    pos, neg = S.split_candidates(cands, 3, 1, 2)
    assert [c["text"] for c in pos] == ["a", "b", "f"]
    assert [c["text"] for c in neg] == ["c", "d"]  # "A" duplicates "a"; -1 and 0 in neither


def test_positive_aware_negatives_filters():
    pool = [("n1", 0.80), ("n2", 0.76), ("n3", 0.74), ("n4", 0.50), ("n5", 0.30)]
    rng = np.random.default_rng(0)
    # p = min(0.8, 0.9) = 0.8: perc keeps s < 0.76; margin keeps s < 0.75
    perc = S.positive_aware_negatives(pool, [0.9, 0.8], "perc_pos", 0.95, 0.05, 10, 10, rng)
    assert [t for t, _ in perc] == ["n3", "n4", "n5"]
    margin = S.positive_aware_negatives(pool, [0.8], "margin_pos", 0.95, 0.05, 10, 10, rng)
    assert [t for t, _ in margin] == ["n3", "n4", "n5"]
    margin2 = S.positive_aware_negatives(pool, [0.8], "margin_pos", 0.95, 0.03, 10, 10, rng)
    assert [t for t, _ in margin2] == ["n2", "n3", "n4", "n5"]
    sampled = S.positive_aware_negatives(pool, [1.0], "perc_pos", 0.95, 0.05, 4, 2, rng)
    assert len(sampled) == 2 and {t for t, _ in sampled} <= {"n2", "n3", "n4", "n5"}
    assert sampled == sorted(sampled, key=lambda c: -c[1])


def run_all(tmp_path: pathlib.Path, backend, overrides=()) -> S.Context:
    ctx = make_ctx(tmp_path, backend, ["sources.sample_size=10", *overrides])
    S.run_pipeline(ctx, nv_negatives=True)
    return ctx


def test_pipeline_annotation_split_reasoning_and_schema(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")
    responder = Responder()
    ctx = run_all(tmp_path, scripted(responder))
    summaries = json.loads((ctx.work_dir / "pipeline_summary.json").read_text())
    ann = summaries["annotations"]
    n_queries = summaries["queries"]["records_final"]
    assert ann["pairs"] == 5 * n_queries == responder.calls["judge"] - ann["llm_retried"]
    # d2's text is never scored: its answers stay unparsable after both attempts
    d2_pairs = sum(1 for q in read_jsonl(ctx.final_path("annotations"))
                   for c in q["candidates"] if c["doc_id"] == "d2")
    assert ann["label_unparsable"] == d2_pairs and ann["llm_final_failures"] == d2_pairs
    assert ann["llm_parse_failures"] == 2 * d2_pairs
    assert ann["parse_failure_rate"] == pytest.approx(2 * d2_pairs / ann["llm_requests"],
                                                      abs=1e-4)
    # split: every pos shares the query's topic (score 5), every neg does not (score 1)
    for rec in read_jsonl(ctx.final_path("split")):
        topic = next(t for t in TOPICS if t.split()[0] in rec["query"]).split()[0]
        assert all(topic in p for p in rec["pos"]) and all(topic not in n for n in rec["neg"])
        assert rec["pos_scores"] == [5] * len(rec["pos"]) and set(rec["neg_scores"]) == {1}
    split = summaries["split"]
    assert split["items_out"] + sum(v for k, v in split.items() if k.startswith("dropped")) \
        == split["items_in"]
    # final training file: reasoning query present, schema-valid
    lines = ctx.final_path("reasoning").read_text().splitlines()
    assert len(lines) == split["items_out"] > 0
    for number, line in enumerate(lines, 1):
        rec = parse_record_line(line, source="final", line_number=number,
                                require_reasoning_query=True)
        assert rec.reasoning_query.startswith("It needs: ") and "scratch" not in \
            rec.reasoning_query
        assert rec.prompt == ctx.domain.instruction and rec.domain == "biology"
        assert rec.train_group_size == 16 and rec.batch_size == 8
        # provenance survives into the training file: the source the query was written from
        source = next(q for q in read_jsonl(ctx.final_path("queries")) if q["id"] == rec.id)
        assert rec.source_id == source["source_id"] and rec.source_id not in rec.pos
    assert summaries["reasoning"]["records_final"] == len(lines)
    # NV negatives: annotator positives, teacher-filtered negatives
    nv = list(read_jsonl(ctx.final_path("nv_negatives")))
    for rec in nv:
        assert len(rec["neg"]) <= 4 and not set(rec["neg"]) & set(rec["pos"])
        assert max(rec["neg_scores"]) < 0.95 * min(rec["pos_scores"])


def test_unjudged_pool_supplies_negatives_when_the_judge_finds_none(tmp_path):
    """A lenient judge (every candidate a positive) leaves no judged negative: by the method's
    split rule every query is dropped. With ``mining.pool_k`` the teacher's ranks past the judged
    top_k (checked against a brute-force ranking) supply NV-Retriever negatives below 0.95 x the
    lowest positive's score, and the judged lists stay what they were."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        make_corpus(tmp_path / sub / "corpus.jsonl")

    def lenient(backend_responder):
        backend_responder.score_for = lambda query, doc: "<score>4</score>"
        return backend_responder

    strict_ctx = run_all(tmp_path / "a", scripted(lenient(Responder())))
    split = json.loads((strict_ctx.stage_dir("split") / "summary.json").read_text())
    assert split["items_out"] == 0 and split["dropped_no_neg"] == split["items_in"] > 0

    ctx = run_all(tmp_path / "b", scripted(lenient(Responder())),
                  ["mining.pool_k=12", "split.require_judged_negative=false",
                   "reasoning.input=nv_negatives"])
    corpus = S.load_corpus(tmp_path / "b" / "corpus.jsonl")
    emb = bag_of_words_embed([d["text"] for d in corpus])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    text_of = {d["id"]: d["text"] for d in corpus}
    judged_before = {q["id"]: [c["doc_id"] for c in q["candidates"]]
                     for q in read_jsonl(strict_ctx.final_path("candidates"))}
    mined = {q["id"]: q for q in read_jsonl(ctx.final_path("candidates"))}
    for qid, q in mined.items():
        assert [c["doc_id"] for c in q["candidates"]] == judged_before[qid]
        qv = bag_of_words_embed([f"Instruct: {ctx.domain.instruction}\nQuery: {q['query']}"])[0]
        scores = emb @ (qv / np.linalg.norm(qv))
        allowed = [i for i, d in enumerate(corpus) if d["id"] != q["source_id"]]
        ref = sorted(allowed, key=lambda i: -scores[i])[5:12]
        np.testing.assert_allclose([c["score"] for c in q["pool"]], scores[ref], atol=1e-5)
        assert [c["rank"] for c in q["pool"]] == list(range(5, 12))
        assert q["source_id"] not in {c["doc_id"] for c in q["pool"]}
    records = list(read_jsonl(ctx.final_path("nv_negatives")))
    nv = json.loads((ctx.stage_dir("nv_negatives") / "summary.json").read_text())
    assert records and nv["neg_unjudged"] == sum(len(r["neg"]) for r in records)
    for rec in records:
        q = mined[rec["id"]]
        pool_ids = {c["doc_id"] for c in q["pool"]}
        assert set(rec["neg_ids"]) <= pool_ids  # every judged candidate is a positive here
        assert [text_of[i] for i in rec["neg_ids"]] == rec["neg"]
        assert max(rec["neg_scores"]) < 0.95 * min(rec["pos_scores"])
        assert len(rec["neg"]) <= 4 and not set(rec["neg"]) & set(rec["pos"])
    split = json.loads((ctx.stage_dir("split") / "summary.json").read_text())
    assert split["kept_without_judged_negative"] == split["items_out"] == len(mined)
    final = ctx.final_path("reasoning").read_text().splitlines()
    assert len(final) == len(records)


@pytest.mark.parametrize("overrides, message", [
    (["split.require_judged_negative=false"], "reasoning.input=nv_negatives"),
    (["mining.pool_k=3"], "mining.pool_k"),
    (["mining.top_k=0"], "mining.top_k"),
])
def test_pool_and_split_settings_are_checked(tmp_path, overrides, message):
    from remixer.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["mining.top_k=5", *overrides])


def test_reasoning_modes_and_missing_reasoning(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")

    def reason_for(q):
        return "<think>never closed" if "d9 " in q else f"Needs <{q[:10]}>"

    responder = Responder(query_for=lambda src: "Why " + " ".join(src.split()[:10]),
                          reason_for=reason_for)
    ctx = run_all(tmp_path, scripted(responder),
                  ["reasoning.mode=query_plus_reasoning", "reasoning.input=nv_negatives",
                   "sources.sample_size=100"])
    final = [json.loads(line) for line in ctx.final_path("reasoning").read_text().splitlines()]
    summary = json.loads((ctx.stage_dir("reasoning") / "summary.json").read_text())
    assert final
    for rec in final:
        if "d9 " in rec["query"]:
            assert "reasoning_query" not in rec
        else:
            assert rec["reasoning_query"] == f"{rec['query']}\n\nNeeds <{rec['query'][:10]}>"
        assert len(rec["neg"]) <= 4  # NV negatives were the input
    assert summary["missing_reasoning_query"] == sum("d9 " in r["query"] for r in final) == 1
    # kept in the training file without a reasoning query, and counted there too
    assert summary["without_reasoning_query"] == 1
    assert summary["with_reasoning_query"] == len(final) - 1


def test_answers_cut_at_max_tokens_are_counted_and_thinking_is_off(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")
    cut: Counter = Counter()

    def score_for(query: str, doc: str):
        if "d5 " in doc:  # a judge that rambles past the cap: no score tag, finish "length"
            cut["d5"] += 1
            return Generation("<think>let me think about " + "this " * 50, 2048, None, "length")
        if "d6 " in doc:  # cut off after its score: parsable, still counted
            cut["d6"] += 1
            return Generation("<score>4</score> and more", 2048, None, "length")
        return Responder.default_score(query, doc)

    backend = scripted(Responder(score_for=score_for))
    ctx = make_ctx(tmp_path, backend, ["sources.sample_size=100"])
    for stage in ("sources", "queries", "candidates", "annotations"):
        S.STAGE_FUNCTIONS[stage](ctx)
    summary = json.loads((ctx.stage_dir("annotations") / "summary.json").read_text())
    assert cut["d5"] + cut["d6"] > 0
    assert summary["answers_hit_max_tokens"] == cut["d5"] + cut["d6"]
    answered = summary["llm_requests"] - summary["llm_request_errors"]
    assert summary["max_tokens_hit_rate"] == round((cut["d5"] + cut["d6"]) / answered, 4)
    labels = {c["doc_id"]: c["label"] for q in read_jsonl(ctx.final_path("annotations"))
              for c in q["candidates"]}
    assert labels.get("d5", -1) == -1 and labels.get("d6", 4) == 4
    queries_summary = json.loads((ctx.stage_dir("queries") / "summary.json").read_text())
    assert queries_summary["answers_hit_max_tokens"] == 0  # always reported
    # every LLM request went out with thinking off (the default of every stage)
    assert backend.generate_sampling
    assert all(s["chat_template_kwargs"] == {"enable_thinking": False}
               for s in backend.generate_sampling)


@pytest.mark.parametrize("cut", [None, 60])
def test_judge_sees_at_most_max_document_chars_of_each_candidate(tmp_path, cut):
    make_corpus(tmp_path / "corpus.jsonl")
    backend = scripted()
    ctx = make_ctx(tmp_path, backend, ["sources.sample_size=100",
                                       f"annotation.max_document_chars={json.dumps(cut)}"])
    for stage in ("sources", "queries", "candidates", "annotations"):
        S.STAGE_FUNCTIONS[stage](ctx)
    bodies = [between(p)[1] for b in backend.generate_batches for p in b
              if "You judge how useful" in p]
    texts = {c["text"] for q in read_jsonl(ctx.final_path("annotations"))
             for c in q["candidates"]}  # the records keep every candidate's whole text
    assert bodies and any(len(t) > 60 for t in texts)
    if cut is None:
        assert set(bodies) == texts
        return
    for body in bodies:
        if body in texts:  # a short document goes in whole
            assert len(body) <= cut
            continue
        assert body.endswith(" ...") and len(body) <= cut + len(" ...")
        kept = body.removesuffix(" ...")
        sources = [t for t in texts if t.startswith(kept)]
        assert sources and all(len(t) > cut and t[len(kept)] == " " for t in sources)
    assert len(set(bodies)) == len(texts)


def test_max_document_chars_must_be_a_positive_integer():
    from remixer.config import ConfigError, load_config

    assert load_config(None, ["annotation.max_document_chars=800"])["annotation"][
        "max_document_chars"] == 800
    for bad in ("0", "-3", "1.5", "true", '"800"'):
        with pytest.raises(ConfigError, match="max_document_chars"):
            load_config(None, [f"annotation.max_document_chars={bad}"])


class CrashingBackend(ScriptedBackend):
    """Dies (like a killed process) on the n-th relevance batch."""

    def __init__(self, responder, crash_on: int):
        super().__init__(responder, bag_of_words_embed)
        self.crash_on = crash_on
        self.judge_batches = 0

    def generate(self, prompts, sampling):
        if "You judge how useful" in prompts[0]:
            self.judge_batches += 1
            if self.judge_batches == self.crash_on:
                raise KeyboardInterrupt("simulated kill")
        return super().generate(prompts, sampling)


def test_pipeline_resumes_after_a_crash_and_matches_an_uninterrupted_run(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        make_corpus(tmp_path / sub / "corpus.jsonl")
    reference = run_all(tmp_path / "a", scripted())

    crashing = CrashingBackend(Responder(), crash_on=3)  # shard 0 needs 2 batches (a retry)
    with pytest.raises(KeyboardInterrupt):
        run_all(tmp_path / "b", crashing)
    ann_dir = tmp_path / "b" / "work" / "annotations"
    assert (ann_dir / "shard-00000.stats.json").exists()
    assert not (ann_dir / "shard-00001.stats.json").exists()
    assert not (tmp_path / "b" / "work" / "split").exists()

    resumed_backend = scripted()
    resumed = run_all(tmp_path / "b", resumed_backend)
    done_queries = {json.loads(line)["query"]
                    for line in (ann_dir / "shard-00000.jsonl").read_text().splitlines()}
    resent = [p for batch in resumed_backend.generate_batches for p in batch]
    assert not any("You create realistic" in p for p in resent)  # queries were complete
    judged = [p for p in resent if "You judge how useful" in p]
    assert judged and not any(q in p for p in judged for q in done_queries)  # shard 0 not redone
    for stage in ("queries", "candidates", "annotations", "split", "nv_negatives", "reasoning"):
        assert resumed.final_path(stage).read_text() == reference.final_path(stage).read_text()


def test_resume_refuses_another_model_but_not_another_server(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")
    ctx = make_ctx(tmp_path, scripted(), ["sources.sample_size=6", "models.writer.model=A"])
    S.run_sources(ctx)
    S.run_queries(ctx)
    moved = make_ctx(tmp_path, scripted(), ["sources.sample_size=6", "models.writer.model=A",
                                            "models.writer.max_concurrency=99",
                                            "models.writer.base_url=http://elsewhere:1"])
    assert S.run_queries(moved)["records_final"] == 6  # everything reused
    other = make_ctx(tmp_path, scripted(), ["sources.sample_size=6", "models.writer.model=B"])
    with pytest.raises(StageError, match="another plan"):
        S.run_queries(other)


def test_backend_outage_stops_the_stage_without_recording_the_shard(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")
    down = ScriptedBackend(lambda _p: ConnectionError("connection refused"), bag_of_words_embed)
    ctx = make_ctx(tmp_path, down, ["sources.sample_size=6"])
    S.run_sources(ctx)
    with pytest.raises(StageError, match="backend unavailable"):
        S.run_queries(ctx)
    assert not list(ctx.stage_dir("queries").glob("shard-*.stats.json"))
    healthy = make_ctx(tmp_path, scripted(), ["sources.sample_size=6"])
    assert S.run_queries(healthy)["records_final"] == 6


def test_bad_prompts_alone_do_not_look_like_an_outage(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl")
    rejecting = ScriptedBackend(lambda _p: ValueError("HTTP 400: prompt is too long"),
                                bag_of_words_embed)
    ctx = make_ctx(tmp_path, rejecting, ["sources.sample_size=6"])
    S.run_sources(ctx)
    summary = S.run_queries(ctx)  # every item fails for its own reason: counted, stage ends
    assert summary["records_final"] == 0 and summary["dropped_no_valid_query"] == 6
    assert summary["llm_request_errors"] == 6 * 3


@pytest.mark.parametrize("error, item", [
    ("prompt_too_long: 5000 tokens > 2047", True),
    ("HTTPStatusError: HTTP 400: context length exceeded", True),
    ("HTTPStatusError: HTTP 429: slow down", False),
    ("HTTPStatusError: HTTP 503: unavailable", False),
    ("URLError: <urlopen error [Errno 111] Connection refused>", False),
    ("TimeoutError: timed out", False),
])
def test_item_errors_are_told_apart_from_backend_errors(error, item):
    assert S.is_item_error(error) is item
