"""Evaluation throughput: our corpus encoding + exact jax search vs sentence-transformers
encoding + faiss (exact inner-product) search, on the same model and corpus, one run each.

    python benchmarks/eval_throughput.py [--model HF_DIR] [--num-docs 2000] [--num-queries 300]
        [--max-length 256] [--batch-size 32] [--top-k 100] [--out results.json]

Without ``--model`` a small random-initialised Qwen3 HF folder is built (``Qwen3Config`` with
few layers, the real Qwen3 tokenizer from ../shared/data/qwen3_tokenizer). Corpus and queries come
from ../shared/data/beir_scifact. The sentence-transformers model is assembled explicitly
(Transformer + last-token Pooling + Normalize), so it pools exactly like our encoder. Reported:
documents/s for encoding (ours: first pass, which includes compiling each length bucket, and
a second, compiled pass), search time, end-to-end documents/s (first pass + search), and the
agreement of the two pipelines (max |embedding difference|, top-10 overlap).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import machine_line, warn_if_busy  # noqa: E402  (before anything imports JAX)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("REASONEMBED_SHARED_DATA", REPO.parent / "shared" / "data"))


def build_tiny_qwen3(out_dir: pathlib.Path, layers: int, hidden: int) -> pathlib.Path:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=hidden // 8, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    Qwen3Model(config).eval().save_pretrained(out_dir, safe_serialization=True)
    for name in os.listdir(SHARED / "qwen3_tokenizer"):
        shutil.copy(SHARED / "qwen3_tokenizer" / name, out_dir / name)
    return out_dir


def load_scifact(num_docs: int, num_queries: int) -> tuple[list[str], list[str]]:
    from reasonembed_jax.evaluation.datasets import read_jsonl

    docs = []
    for row in read_jsonl(SHARED / "beir_scifact" / "corpus.jsonl"):
        docs.append(f"{row.get('title') or ''} {row['text']}".strip())
        if len(docs) == num_docs:
            break
    queries = [r["text"] for r, _ in zip(read_jsonl(SHARED / "beir_scifact" / "queries.jsonl"),
                                         range(num_queries), strict=False)]
    return docs, queries


def run_ours(model_dir, docs, queries, args) -> tuple[dict, object, object]:
    import jax

    from reasonembed_jax.encode import TextEncoder
    from reasonembed_jax.evaluation.cache import encode_corpus
    from reasonembed_jax.evaluation.search import exact_search

    encoder = TextEncoder.from_pretrained(model_dir, max_length=args.max_length, dtype="float32")
    warm = encoder.encode(docs[: args.batch_size], batch_size=args.batch_size, progress=False)
    del warm  # compile the common bucket outside the timing (sentence-transformers has no jit)
    started = time.perf_counter()
    corpus, _ = encode_corpus(encoder, [str(i) for i in range(len(docs))], docs, cache_dir=None,
                              batch_size=args.batch_size, max_length=args.max_length,
                              progress=False, log=lambda m: None)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()  # second pass: every length bucket is compiled by now
    encoder.encode(docs, batch_size=args.batch_size, max_length=args.max_length, progress=False)
    encode_compiled_s = time.perf_counter() - started
    q = encoder.encode(queries, batch_size=args.batch_size, progress=False)
    started = time.perf_counter()
    result = exact_search(q, corpus, args.top_k)
    search_s = time.perf_counter() - started
    return ({"encode_seconds": encode_s, "encode_seconds_compiled": encode_compiled_s,
             "search_seconds": search_s,
             "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}, corpus, result)


def run_sentence_transformers(model_dir, docs, queries, args) -> tuple[dict, object, object]:
    import faiss
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(
        str(model_dir), max_seq_length=args.max_length,
        # plain text in, last hidden state out: no chat template (ST 6 otherwise wraps the text)
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )
    pooling = models.Pooling(transformer.get_word_embedding_dimension(),
                             pooling_mode="lasttoken")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    model.encode(docs[: args.batch_size], batch_size=args.batch_size)  # warm-up, like ours
    started = time.perf_counter()
    with torch.inference_mode():
        corpus = model.encode(docs, batch_size=args.batch_size, convert_to_numpy=True)
    encode_s = time.perf_counter() - started
    q = model.encode(queries, batch_size=args.batch_size, convert_to_numpy=True)
    started = time.perf_counter()
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    scores, indices = index.search(np.ascontiguousarray(q, dtype=np.float32), args.top_k)
    search_s = time.perf_counter() - started
    return ({"encode_seconds": encode_s, "search_seconds": search_s,
             "torch_threads": torch.get_num_threads()}, corpus, indices)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF folder (default: tiny random Qwen3)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the tiny random model")
    parser.add_argument("--hidden", type=int, default=256, help="width of the tiny random model")
    parser.add_argument("--num-docs", type=int, default=2000)
    parser.add_argument("--num-queries", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--out", default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import numpy as np

    machine_before = machine_line()
    print(machine_before, flush=True)
    warn_if_busy()
    tmp = None
    model_dir = pathlib.Path(args.model) if args.model else None
    if model_dir is None:
        tmp = tempfile.mkdtemp(prefix="tiny_qwen3_")
        model_dir = build_tiny_qwen3(pathlib.Path(tmp), args.layers, args.hidden)
    try:
        docs, queries = load_scifact(args.num_docs, args.num_queries)
        ours, our_corpus, our_result = run_ours(model_dir, docs, queries, args)
        ref, st_corpus, st_indices = run_sentence_transformers(model_dir, docs, queries, args)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    overlap = np.mean([len(set(a[:10]) & set(b[:10])) / 10
                       for a, b in zip(our_result.indices, st_indices, strict=True)])
    figures = {
        "model": str(args.model or f"random Qwen3 ({args.layers} layers, hidden {args.hidden})"),
        "num_docs": len(docs), "num_queries": len(queries), "max_length": args.max_length,
        "batch_size": args.batch_size, "top_k": args.top_k,
        "ours": {**ours, "encode_docs_per_s": len(docs) / ours["encode_seconds"],
                 "encode_docs_per_s_compiled": len(docs) / ours["encode_seconds_compiled"],
                 "end_to_end_docs_per_s":
                     len(docs) / (ours["encode_seconds"] + ours["search_seconds"])},
        "sentence_transformers_faiss": {
            **ref, "encode_docs_per_s": len(docs) / ref["encode_seconds"],
            "end_to_end_docs_per_s": len(docs) / (ref["encode_seconds"] + ref["search_seconds"])},
        "max_abs_embedding_diff": float(np.abs(np.asarray(our_corpus) - st_corpus).max()),
        "top10_overlap": float(overlap),
        "machine_before": machine_before, "machine_after": machine_line(),
    }
    print(json.dumps(figures, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
