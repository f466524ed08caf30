"""Build training records (``reasonembed_jax.records`` schema) from BEIR data or BRIGHT examples.

``beir``: queries + qrels + corpus in BEIR layout; positives from the qrels (score > 0); negatives
mined with BM25 (bm25s) or an embedder (``--embedder HF_DIR``, loaded with
``reasonembed_jax.encode.TextEncoder``), filtered with NV-Retriever's positive-aware filters
(``retrieval.positive_aware_mask``).

``bright``: BRIGHT ``examples`` files (demo data). Positive: the example's ``gold_answer``;
reasoning query: its ``reasoning`` field (optionally after the query); negatives: the gold answers
of the *other* queries of the same task, ranked by BM25 against the query and filtered the same way.
Tasks whose ``gold_answer`` is "N/A" (aops, leetcode, pony, theoremqa-*) have no passage to use.
WARNING: BRIGHT examples are its test queries; never evaluate on BRIGHT a model trained on them.

Examples::

    python -m reasonembed_jax.data.build_records bright --bright-dir ../shared/data/bright \\
        --out-dir reasonembed_jax/data/demo
    python -m reasonembed_jax.data.build_records beir --dataset-dir ../shared/data/beir_scifact \\
        --split train --domain scifact --out scifact.jsonl.gz --negatives bm25
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from reasonembed_jax import retrieval
from reasonembed_jax.cli import run_cli
from reasonembed_jax.data import mining
from reasonembed_jax.instructions import task_instruction
from reasonembed_jax.records import dump_record, validate_record

log = logging.getLogger(__name__)

# BRIGHT tasks with a real gold_answer passage (their instructions: reasonembed_jax.instructions).
BRIGHT_GOLD_ANSWER_TASKS = ("biology", "earth-science", "economics", "psychology", "robotics",
                            "stackoverflow", "sustainable-living")


def _open_text(path: str, mode: str = "rt"):  # noqa: ANN202
    return gzip.open(path, mode, encoding="utf-8") if path.endswith(".gz") else open(
        path, mode, encoding="utf-8")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All JSON objects of a JSONL(.gz) file (blank lines skipped)."""
    with _open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_records(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Validates and writes records as JSONL (gzipped if ``path`` ends in .gz); returns the count.

    Gzip output is written with mtime 0 so the same records give byte-identical files.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = [dump_record(validate_record(r)) for r in records]
    payload = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    if path.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                    filename="") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    return len(lines)


def _truncate(text: str, max_chars: int | None) -> str:
    return text if max_chars is None or len(text) <= max_chars else text[:max_chars]


def mine_negatives(
    scores: np.ndarray,
    positives: Sequence[Sequence[int]],
    *,
    num_negatives: int,
    depth: int,
    filter_name: str,
    perc: float,
    margin: float,
    sample_from_top: int | None,
    seed: int,
    excluded: Sequence[Sequence[int]] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Teacher scores -> per query (negative ids, their scores), plus ``s_min`` per query."""
    ids, cand_scores, s_min = retrieval.rank_candidates(scores, positives, depth, excluded)
    keep = retrieval.positive_aware_mask(cand_scores, s_min, filter_name, perc=perc,
                                         margin=margin)
    chosen = retrieval.select_negatives(ids, keep, num_negatives,
                                        sample_from_top=sample_from_top,
                                        rng=np.random.default_rng(seed))
    neg_scores = [scores[q][c] for q, c in enumerate(chosen)]
    return chosen, neg_scores, s_min


def build_bright_records(
    examples: Sequence[dict[str, Any]],
    task: str,
    *,
    num_negatives: int,
    max_queries: int | None,
    max_chars: int | None,
    filter_name: str,
    perc: float,
    margin: float,
    reasoning_mode: str,
    instruction: str,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Records for one BRIGHT task; returns them and counts of skipped examples by reason."""
    skipped = {"no_gold_answer": 0, "no_reasoning": 0, "no_negative_after_filter": 0}
    usable = []
    for ex in examples:
        answer = ex.get("gold_answer")
        if not isinstance(answer, str) or not answer.strip() or answer.strip() == "N/A":
            skipped["no_gold_answer"] += 1
            continue
        if not isinstance(ex.get("reasoning"), str) or not ex["reasoning"].strip():
            skipped["no_reasoning"] += 1
            continue
        usable.append(ex)
    if not usable:
        return [], skipped
    passages = [_truncate(ex["gold_answer"], max_chars) for ex in usable]
    scores = retrieval.bm25_scores([ex["query"] for ex in usable], passages)
    # Identical answer texts under two queries are positives for both, never negatives.
    by_text: dict[str, list[int]] = {}
    for i, p in enumerate(passages):
        by_text.setdefault(p, []).append(i)
    positives = [by_text[p] for p in passages]
    chosen, neg_scores, s_min = mine_negatives(
        scores, positives, num_negatives=num_negatives, depth=len(passages),
        filter_name=filter_name, perc=perc, margin=margin, sample_from_top=None, seed=seed)
    order = np.random.default_rng(seed).permutation(len(usable))
    records = []
    for i in order.tolist():
        if max_queries is not None and len(records) >= max_queries:
            break
        if len(chosen[i]) == 0:
            skipped["no_negative_after_filter"] += 1
            continue
        ex = usable[i]
        reasoning = ex["reasoning"].strip()
        if reasoning_mode == "query+reasoning":
            reasoning = f"{ex['query'].strip()}\n{reasoning}"
        records.append({
            "id": f"bright-{task}-{ex['id']}",
            "domain": task.replace("-", "_"),
            "prompt": instruction,
            "query": ex["query"],
            "reasoning_query": reasoning,
            "pos": [passages[i]],
            "neg": [passages[j] for j in chosen[i].tolist()],
            "pos_scores": [float(s_min[i])],
            "neg_scores": [float(s) for s in neg_scores[i].tolist()],
        })
    return records, skipped


def load_beir(dataset_dir: str, split: str | None) -> tuple[dict[str, str], dict[str, str],
                                                            dict[str, dict[str, int]]]:
    """``(queries, corpus texts, qrels)`` of a BEIR-layout folder; corpus text = title + text.
    ``split=None`` reads no qrels (empty dict)."""
    def find(name: str) -> str:
        for candidate in (name, name + ".gz"):
            path = os.path.join(dataset_dir, candidate)
            if os.path.exists(path):
                return path
        raise FileNotFoundError(f"{dataset_dir} has no {name}[.gz]")

    corpus = {}
    for doc in read_jsonl(find("corpus.jsonl")):
        title = (doc.get("title") or "").strip()
        text = (doc.get("text") or "").strip()
        corpus[str(doc["_id"])] = f"{title}\n{text}" if title else text
    queries = {str(q["_id"]): q["text"] for q in read_jsonl(find("queries.jsonl"))}
    qrels: dict[str, dict[str, int]] = {}
    if split is None:
        return queries, corpus, qrels
    with _open_text(find(os.path.join("qrels", f"{split}.tsv"))) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        if not header or header[0] != "query-id":
            raise ValueError(f"unexpected qrels header {header}")
        for row in reader:
            if len(row) < 3:
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return queries, corpus, qrels


def build_beir_records(
    queries: dict[str, str],
    corpus: dict[str, str],
    qrels: dict[str, dict[str, int]],
    *,
    domain: str,
    instruction: str,
    negatives: str,
    embedder: Any = None,
    num_negatives: int,
    depth: int,
    filter_name: str,
    perc: float,
    margin: float,
    sample_from_top: int | None,
    max_chars: int | None,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Records for the qrels' queries; returns them and counts of skipped queries by reason."""
    doc_ids = sorted(corpus)
    doc_row = {d: i for i, d in enumerate(doc_ids)}
    docs = [corpus[d] for d in doc_ids]
    skipped = {"unknown_query": 0, "no_positive_in_corpus": 0, "no_negative_after_filter": 0}
    qids, positives = [], []
    for qid in sorted(qrels):
        pos = [doc_row[d] for d, rel in sorted(qrels[qid].items()) if rel > 0 and d in doc_row]
        if qid not in queries:
            skipped["unknown_query"] += 1
        elif not pos:
            skipped["no_positive_in_corpus"] += 1
        else:
            qids.append(qid)
            positives.append(pos)
    texts = [queries[q] for q in qids]
    if negatives == "bm25":
        scores = retrieval.bm25_scores(texts, docs)
    elif negatives == "embedder":
        if embedder is None:
            raise ValueError("--negatives embedder needs --embedder")
        scores = mining.embedding_scores(embedder, texts, docs, instruction=instruction or None)
    else:
        raise ValueError(f"unknown negatives source '{negatives}'")
    # A passage identical to the query is never a useful negative.
    excluded = [[doc_row[d] for d in doc_ids if corpus[d].strip() == t.strip()] for t in texts]
    chosen, neg_scores, _ = mine_negatives(
        scores, positives, num_negatives=num_negatives, depth=depth, filter_name=filter_name,
        perc=perc, margin=margin, sample_from_top=sample_from_top, seed=seed, excluded=excluded)
    records = []
    for i, qid in enumerate(qids):
        if len(chosen[i]) == 0:
            skipped["no_negative_after_filter"] += 1
            continue
        records.append({
            "id": f"{domain}-{qid}",
            "domain": domain,
            "prompt": instruction,
            "query": texts[i],
            "pos": [_truncate(docs[j], max_chars) for j in positives[i]],
            "neg": [_truncate(docs[j], max_chars) for j in chosen[i].tolist()],
            "pos_scores": [float(scores[i][j]) for j in positives[i]],
            "neg_scores": [float(s) for s in neg_scores[i].tolist()],
        })
    return records, skipped


def _add_mining_args(p: argparse.ArgumentParser, *, num_negatives: int) -> None:
    p.add_argument("--num-negatives", type=int, default=num_negatives,
                   help="negatives kept per query (default %(default)s)")
    p.add_argument("--filter", choices=retrieval.FILTERS, default="perc_pos",
                   help="positive-aware filter: perc_pos keeps s(q,n) < PERC*s_min, margin_pos "
                        "keeps s(q,n) < s_min - MARGIN (default %(default)s)")
    p.add_argument("--perc", type=float, default=0.95, help="TopK-PercPos factor")
    p.add_argument("--margin", type=float, default=0.05, help="TopK-MarginPos margin")
    p.add_argument("--max-chars", type=int, default=None,
                   help="truncate every passage to this many characters")
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reasonembed_jax.data.build_records",
        description="Build ReasonEmbed training records (JSONL) from BEIR or BRIGHT data.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bright", help="demo records from BRIGHT examples (one file per task)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--bright-dir", required=True, help="folder holding examples/<task>.jsonl.gz")
    b.add_argument("--out-dir", required=True, help="writes <domain>.jsonl.gz here")
    b.add_argument("--tasks", default=",".join(BRIGHT_GOLD_ANSWER_TASKS),
                   help="comma-separated tasks (default: every task with gold answers)")
    b.add_argument("--max-queries", type=int, default=None, help="records per task at most")
    b.add_argument("--reasoning-mode", choices=("reasoning", "query+reasoning"),
                   default="reasoning", help="reasoning_query = the reasoning field alone, or "
                                             "the query followed by it")
    b.add_argument("--instruction", default=None,
                   help="the records' prompt for every task (default: each task's instruction "
                        "from reasonembed_jax.instructions)")
    _add_mining_args(b, num_negatives=7)

    e = sub.add_parser("beir", help="records from a BEIR-layout dataset with mined negatives")
    e.add_argument("--dataset-dir", required=True,
                   help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    e.add_argument("--split", default="train")
    e.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz")
    e.add_argument("--domain", required=True, help="domain name written into every record")
    e.add_argument("--instruction", default="", help="the records' prompt (query instruction)")
    e.add_argument("--table-instruction", action="store_true",
                   help="the records' prompt is the --domain's instruction from "
                        "reasonembed_jax.instructions (instead of --instruction)")
    e.add_argument("--negatives", choices=("bm25", "embedder"), default="bm25")
    e.add_argument("--embedder", default=None,
                   help="local HF model folder for --negatives embedder (TextEncoder)")
    e.add_argument("--embedder-max-length", type=int, default=512)
    e.add_argument("--depth", type=int, default=100, help="candidates ranked per query")
    e.add_argument("--sample-from-top", type=int, default=None,
                   help="draw the negatives from the top K filtered candidates (paper: 4 of 10)")
    _add_mining_args(e, num_negatives=15)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args = parse_args(argv)
    if args.command == "bright":
        total = 0
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            path = os.path.join(args.bright_dir, "examples", f"{task}.jsonl.gz")
            records, skipped = build_bright_records(
                read_jsonl(path), task, num_negatives=args.num_negatives,
                max_queries=args.max_queries, max_chars=args.max_chars, filter_name=args.filter,
                perc=args.perc, margin=args.margin, reasoning_mode=args.reasoning_mode,
                instruction=(task_instruction(task) if args.instruction is None
                             else args.instruction), seed=args.seed)
            if not records:
                log.warning("%s: no usable example (%s)", task, skipped)
                continue
            out = os.path.join(args.out_dir, f"{task.replace('-', '_')}.jsonl.gz")
            n = write_records(out, records)
            total += n
            log.info("%s: %d records -> %s (skipped: %s)", task, n, out, skipped)
        log.info("%d records in all", total)
        return 0 if total else 1
    queries, corpus, qrels = load_beir(args.dataset_dir, args.split)
    embedder = None
    if args.negatives == "embedder":
        if not args.embedder:
            raise SystemExit("--negatives embedder needs --embedder HF_DIR")
        from reasonembed_jax.encode import TextEncoder

        embedder = TextEncoder.from_pretrained(args.embedder, max_length=args.embedder_max_length)
    records, skipped = build_beir_records(
        queries, corpus, qrels, domain=args.domain,
        instruction=task_instruction(args.domain) if args.table_instruction else args.instruction,
        negatives=args.negatives, embedder=embedder, num_negatives=args.num_negatives,
        depth=args.depth, filter_name=args.filter, perc=args.perc, margin=args.margin,
        sample_from_top=args.sample_from_top, max_chars=args.max_chars, seed=args.seed)
    n = write_records(args.out, records)
    log.info("%d records -> %s (skipped: %s)", n, args.out, skipped)
    return 0 if n else 1


if __name__ == "__main__":
    run_cli(main)
