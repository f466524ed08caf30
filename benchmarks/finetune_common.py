"""Shared parts of the fine-tuning benchmarks (``scifact_finetune.py``, ``decoder_finetune.py``):
the dev split carved from the training qrels, a documented corpus subset, hard-negative mining
with the project's own miner into (query, positive, negative) triples, scoring and the table.
"""

from __future__ import annotations

import os
import time

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def split_queries(train_qrels: dict, eval_qrels: dict | None, fraction: float, seed: int
                  ) -> tuple[dict, dict]:
    """(training qrels, scored qrels): with ``eval_qrels`` those are scored and every other
    training query is trained on; else a seeded ``fraction`` of the training queries is held out."""
    import numpy as np

    if eval_qrels is not None:
        return {q: r for q, r in train_qrels.items() if q not in eval_qrels}, eval_qrels
    if not 0.0 < fraction < 1.0:
        raise SystemExit(f"--dev-fraction must be in (0, 1), got {fraction}")
    qids = sorted(train_qrels)
    order = np.random.default_rng(seed).permutation(len(qids))
    n_dev = max(1, int(round(fraction * len(qids))))
    dev = {qids[i] for i in order[:n_dev]}
    return ({q: r for q, r in train_qrels.items() if q not in dev},
            {q: r for q, r in train_qrels.items() if q in dev})


def load_splits(args) -> tuple[dict, dict, dict, dict, dict | None]:  # noqa: ANN001
    """``(queries, corpus, train_qrels, dev_qrels, eval_qrels)`` from a BEIR folder as the
    fine-tuning benchmarks' options say (``dataset_dir``, ``qrels``, ``eval_qrels``,
    ``dev_fraction``, ``seed``): the dev split is carved from the training qrels unless
    ``eval_qrels`` names the scored queries; dev queries without text are dropped."""
    from reasonembed_jax.data.build_records import load_beir
    from reasonembed_jax.evaluation.datasets import read_qrels_tsv

    queries, corpus, train_qrels = load_beir(args.dataset_dir, None if args.qrels else "train")
    if args.qrels:
        train_qrels = read_qrels_tsv(args.qrels)
    eval_qrels = read_qrels_tsv(args.eval_qrels) if args.eval_qrels else None
    train_qrels, dev_qrels = split_queries(train_qrels, eval_qrels, args.dev_fraction, args.seed)
    dev_qrels = {q: r for q, r in dev_qrels.items() if q in queries}
    return queries, corpus, train_qrels, dev_qrels, eval_qrels


def subset_corpus(corpus: dict, qrels: list[dict], size: int | None, seed: int) -> dict:
    """``size`` documents of ``corpus``: every document judged in any of ``qrels`` plus a seeded
    random sample of the rest (all of them when ``size`` is None or too small to add any)."""
    import numpy as np

    if size is None or size >= len(corpus):
        return corpus
    gold = {d for qr in qrels for rels in qr.values() for d in rels if d in corpus}
    rest = sorted(set(corpus) - gold)
    extra = max(0, size - len(gold))
    picked = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))[:extra]]
    return {d: corpus[d] for d in sorted(gold) + picked}


class CachedEncoder:
    """Wraps an encoder so texts embedded once (the corpus) are not embedded again."""

    def __init__(self, encoder) -> None:  # noqa: ANN001
        self.encoder = encoder
        self.cache: dict[str, object] = {}

    def encode(self, texts, instruction=None, batch_size=32):  # noqa: ANN001, ANN201
        import numpy as np

        missing = sorted({t for t in texts if t not in self.cache})
        if missing:
            for t, e in zip(missing, self.encoder.encode(missing, instruction=instruction,
                                                         batch_size=batch_size, progress=False),
                            strict=True):
                self.cache[t] = e
        return np.stack([self.cache[t] for t in texts])


def score(query_emb, doc_emb, qids, doc_ids, qrels, top_k=100) -> dict[str, float]:  # noqa: ANN001
    """nDCG@10, Recall@100, MRR@10 of exact inner-product search (trec_eval semantics)."""
    import numpy as np

    from reasonembed_jax.evaluation.metrics import mean_metrics, per_query_metrics
    from reasonembed_jax.retrieval import top_k_of_scores

    scores = np.asarray(query_emb, np.float32) @ np.asarray(doc_emb, np.float32).T
    run = top_k_of_scores(scores, top_k).to_run(qids, doc_ids)
    return mean_metrics(per_query_metrics({q: qrels[q] for q in qids}, run, METRICS))


def training_triples(records: list[dict]) -> list[dict]:
    """One (query, positive, negative) row per positive of each mined record."""
    rows = []
    for r in records:
        for k, pos in enumerate(r["pos"]):
            rows.append({"id": f"{r['id']}-{k}", "domain": r["domain"], "prompt": r["prompt"],
                         "query": r["query"], "pos": [pos], "neg": r["neg"][:1]})
    return rows


def mine_triples(queries: dict, corpus: dict, train_qrels: dict, embedder, root: str,  # noqa: ANN001
                 seed: int, negatives: str = "embedder") -> tuple[list[dict], str]:
    """Hard negatives from the project's miner (``data.build_records.build_beir_records``):
    ``embedder`` (or BM25 with ``negatives="bm25"``) ranks the corpus per training query,
    NV-Retriever's TopK-PercPos filter (95% of the positive's score) drops likely false
    negatives, the best survivor is the negative. Returns the triples and the records file
    written under ``root``."""
    from reasonembed_jax.data.build_records import build_beir_records, write_records

    t0 = time.perf_counter()
    records, skipped = build_beir_records(
        queries, corpus, train_qrels, domain="scifact", instruction="", negatives=negatives,
        embedder=embedder if negatives == "embedder" else None, num_negatives=1, depth=100,
        filter_name="perc_pos", perc=0.95, margin=0.05, sample_from_top=None, max_chars=None, seed=seed)
    triples = training_triples(records)
    path = os.path.join(root, "scifact_train.jsonl.gz")
    write_records(path, triples)
    print(f"mined {len(records)} records ({skipped}) -> {len(triples)} triples in "
          f"{time.perf_counter() - t0:.1f}s: {path}", flush=True)
    return triples, path


def print_table(results: dict[str, dict], reference: str | None, extra: tuple[str, ...] = ()
                ) -> None:
    """One row per system: the metrics, training seconds, ``extra`` columns, and the
    reference's training time over this system's (>1: faster)."""
    header = (f"{'system':<24}" + "".join(f"{m:>12}" for m in METRICS) + f"{'train s':>10}"
              + "".join(f"{e:>14}" for e in extra) + f"{'vs ref':>8}")
    print(header)
    print("-" * len(header))
    ref_time = results.get(reference, {}).get("train_s") if reference else None
    for name, r in results.items():
        train = r.get("train_s")
        ratio = f"{ref_time / train:.2f}x" if train and ref_time else "-"
        cells = "".join(f"{r[e]:>14.3f}" if isinstance(r.get(e), float) else f"{'-':>14}"
                        for e in extra)
        print(f"{name:<24}" + "".join(f"{r[m]:>12.4f}" for m in METRICS)
              + (f"{train:>10.1f}" if train else f"{'-':>10}") + cells + f"{ratio:>8}")
    print("(vs ref: the reference's training time / this system's; >1 is faster)")
