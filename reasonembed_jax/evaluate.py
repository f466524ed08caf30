"""Retrieval evaluation CLI: BEIR-layout and BRIGHT data, dense models or BM25.

Examples::

  python -m reasonembed_jax.evaluate --model bm25 \\
      --data beir:../shared/data/beir_scifact --split train --out scifact_bm25.json
  python -m reasonembed_jax.evaluate --model /models/my-export \\
      --data bright:/data/BRIGHT:biology,leetcode --top-k 1000 --max-length 8192 --out r.json
  python -m reasonembed_jax.evaluate --workdir runs/exp1 --data bright:/data/BRIGHT --out r.json

Metrics are nDCG@10, recall@10/100 and MRR@10 with trec_eval semantics, per task and macro
averaged over tasks. Corpus embeddings are cached on disk (``--cache-dir``) keyed by the model's
cache key, the length setting and the corpus content.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from collections.abc import Sequence

from reasonembed_jax.cli import UserError, non_negative_float, positive_int, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reasonembed_jax.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local Hugging Face model folder, or 'bm25'")
    source.add_argument("--workdir", help="training workdir; evaluates DIR/export/latest")
    parser.add_argument("--data", action="append", required=True, metavar="SPEC",
                        help="beir:DIR | bright:DIR | bright:DIR:task1,task2 (repeatable)")
    parser.add_argument("--split", default=None,
                        help="BEIR qrels split (default test) or BRIGHT examples configuration "
                             "(default examples; e.g. gpt4_reason)")
    parser.add_argument("--qrels", default=None,
                        help="BEIR qrels file overriding qrels/<split>.tsv")
    parser.add_argument("--query-field", choices=("query", "reasoning"), default="query",
                        help="BRIGHT: original queries or the examples' reasoning text")
    parser.add_argument("--long-documents", action="store_true",
                        help="BRIGHT: long_documents corpus with gold_ids_long")
    parser.add_argument("--instructions", default="short",
                        help="BRIGHT query instructions: short (built-in per task), none, or a "
                             "folder of official BRIGHT instruction configs")
    parser.add_argument("--instruction", default=None,
                        help="one query instruction for every task (overrides --instructions)")
    parser.add_argument("--top-k", type=positive_int, default=1000, help="documents retrieved per query")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="encoding batch size")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="max tokens for queries and documents (default: what the model "
                             "folder carries, e.g. 8192 for the ReasonEmbed recipes' exports; "
                             "else 512)")
    parser.add_argument("--dtype", default="float32", help="model compute dtype for the encoder")
    parser.add_argument("--cache-dir", default=None,
                        help="corpus embedding cache (default $REASONEMBED_CACHE/corpus_embeddings "
                             "or ~/.cache/reasonembed_jax/corpus_embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument("--query-batch-size", type=positive_int, default=256,
                        help="queries per search step")
    parser.add_argument("--corpus-chunk-size", type=positive_int, default=65536,
                        help="documents per search step (split over all devices)")
    parser.add_argument("--bm25-k1", type=non_negative_float, default=0.9)
    parser.add_argument("--bm25-b", type=non_negative_float, default=0.4)
    parser.add_argument("--metrics", default="ndcg@10,recall@10,recall@100,mrr@10",
                        help="comma-separated ndcg@K, recall@K, mrr@K")
    parser.add_argument("--run-dir", default=None, help="also write TREC run files here")
    parser.add_argument("--no-progress", action="store_true", help="no encoding progress bars")
    parser.add_argument("--out", required=True, help="results JSON path")
    return parser


def make_retriever(args: argparse.Namespace):  # noqa: ANN201 (DenseRetriever | BM25Retriever)
    """The retriever named by ``--model``/``--workdir``, and a description for the results."""
    from reasonembed_jax.evaluation.bm25 import BM25Retriever
    from reasonembed_jax.evaluation.cache import default_cache_dir
    from reasonembed_jax.evaluation.pipeline import DenseRetriever, resolve_model_dir

    if args.model == "bm25":
        return BM25Retriever(k1=args.bm25_k1, b=args.bm25_b), "bm25"
    model_dir = resolve_model_dir(args.workdir) if args.workdir else pathlib.Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} not found")
    try:
        from reasonembed_jax.encode import TextEncoder
    except ImportError as e:
        raise ImportError(f"dense evaluation needs reasonembed_jax.encode.TextEncoder ({e})") from e
    encoder = TextEncoder.from_pretrained(model_dir, max_length=args.max_length, dtype=args.dtype)
    source = "--max-length" if args.max_length else f"the model folder {model_dir}"
    args.max_length = encoder.max_length
    print(f"max length {encoder.max_length} tokens (from {source})")
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    retriever = DenseRetriever(
        encoder, batch_size=args.batch_size, max_length=args.max_length, cache_dir=cache_dir,
        query_batch_size=args.query_batch_size, corpus_chunk_size=args.corpus_chunk_size,
        progress=not args.no_progress,
    )
    return retriever, str(model_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    from reasonembed_jax.evaluation.datasets import load_data
    from reasonembed_jax.evaluation.metrics import parse_metric
    from reasonembed_jax.evaluation.pipeline import evaluate_tasks, format_table

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in metrics:
        parse_metric(m)
    if args.qrels and len(args.data) != 1:
        raise UserError("--qrels needs exactly one --data")
    started = time.perf_counter()
    tasks = []
    for spec in args.data:
        tasks.extend(load_data(
            spec, split=args.split, qrels_file=args.qrels, query_field=args.query_field,
            long_documents=args.long_documents,
            instructions=None if args.instructions == "none" else args.instructions,
            instruction=args.instruction,
        ))
    print(f"loaded {len(tasks)} task(s) in {time.perf_counter() - started:.2f} s: "
          + ", ".join(f"{t.name} ({len(t.query_ids)} queries, {len(t.corpus_ids)} docs)"
                      for t in tasks))
    retriever, model_name = make_retriever(args)
    results = evaluate_tasks(tasks, retriever, top_k=args.top_k, metrics=metrics,
                             run_dir=args.run_dir)
    results = {
        "model": model_name,
        "retriever": retriever.describe(),
        "data": args.data,
        "settings": {"split": args.split, "qrels": args.qrels, "query_field": args.query_field,
                     "long_documents": args.long_documents, "top_k": args.top_k,
                     "max_length": args.max_length,
                     "instructions": {t.name: t.instruction for t in tasks}},
        **results,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(format_table(results, metrics))
    print(f"wrote {out} (total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)
