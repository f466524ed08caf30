"""ReMixer end to end with real models on the vLLM engine: synthetic SciFact training records from
an instruct LLM (writer and judge), a real embedder for candidate mining, and a per-stage report.

    python benchmarks/remixer_scifact.py --writer HF_DIR [--judge HF_DIR] --embedder HF_DIR
        [--work-dir runs/remixer_scifact] [--sources 64] [--top-k 8] [--preset cpu|gpu]
        [--set KEY=VALUE ...] [--out report.json] [--markdown report.md] [--restart]

Runs in the synthesis environment (``vllm``, no JAX; ``make bench-remixer`` sets it up):

1. sources: SciFact abstracts (``beir_scifact/corpus.jsonl``, title + text) of 200-5,000
   characters, never one listed in ``beir_scifact/synthesis_exclude_doc_ids.txt`` (gold documents
   of held-out test queries: the paper's no-leakage rule), ``--sources`` of them drawn with the
   seed;
2. queries: one research question/claim per source from the writer (length and education level
   drawn per source);
3. candidates: the embedder (a vLLM pooling model; all-MiniLM-L6-v2 with mean pooling by
   default) ranks the whole corpus for each query, the source and every copy of its text
   excluded; the best ``--top-k`` are judged, ranks up to ``--pool-k`` kept unjudged for step 5;
4. annotations: the judge scores each (query, candidate) 1-5 in ``<score>..</score>``; with
   ``--constrain-judge`` (default on for the CPU preset: a 135M model rarely closes the tag by
   itself) vLLM's structured outputs force the answer to end in a score tag;
5. split (score >= 3 positive, 1-2 negative), NV-Retriever negatives (TopK-PercPos over the
   embedder's scores of the judged non-positives and the unjudged pool; with a pool a query
   needs only a judged positive, since these negatives replace the judged ones), reasoning
   queries from the judge, records validated by ``reasonembed_jax.records``
   (``work-dir/reasoning/final.jsonl`` is the training file).

The ``cpu`` preset sizes everything for this 2-core machine (float32, eager mode, small token
caps, the judge shown the first 700 characters of each candidate: reading prompts dominates a CPU
engine); ``gpu`` keeps the same stages at the paper's sizes (10,000 sources, top 100, 2,048 tokens,
bf16, CUDA graphs): only the sizes change. A re-run resumes where the last one stopped (shards).

Report (stdout, ``--out`` JSON, ``--markdown``): per stage items in/out, tokens generated,
tokens/s, parse failures, answers cut at max_tokens, engine start-up, the judge's score histogram,
positives/negatives per query; five (query, reasoning query, positive) examples verbatim; the
load average and CPU count next to the timings (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("REASONEMBED_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "synthesis"))

PRESETS = {
    # 2-core CPU: small token caps, eager mode, float32 (vLLM's CPU backend).
    "cpu": {"engine": {"max_model_len": 2048, "gpu_memory_utilization": 0.3,
                       "enforce_eager": True, "dtype": "float32", "max_num_seqs": 64},
            "sources": 64, "top_k": 8, "pool_k": 30, "shard_size": 64,
            "query_tokens": 160, "judge_tokens": 192, "reason_tokens": 160,
            "judge_doc_chars": 700},
    # One GPU: the paper's sizes.
    "gpu": {"engine": {"max_model_len": 8192, "gpu_memory_utilization": 0.4,
                       "enforce_eager": False, "dtype": "bfloat16"},
            "sources": 10000, "top_k": 100, "pool_k": None, "shard_size": 1024,
            "query_tokens": 2048, "judge_tokens": 2048, "reason_tokens": 2048,
            "judge_doc_chars": None},
}
STAGE_ORDER = ("sources", "queries", "candidates", "annotations", "split", "nv_negatives",
               "reasoning")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writer", required=True, help="HF folder of the query writer (instruct LLM)")
    p.add_argument("--judge", default=None, help="HF folder of the judge (default: the writer)")
    p.add_argument("--embedder", required=True,
                   help="HF folder of the mining embedder (vLLM pooling model)")
    p.add_argument("--pooling", default="MEAN", help="embedder pooling (MEAN for MiniLM, LAST "
                                                     "for decoder embedders)")
    p.add_argument("--embedder-max-len", type=int, default=256)
    p.add_argument("--dataset-dir", default=str(SHARED / "beir_scifact"))
    p.add_argument("--corpus-docs", type=int, default=None,
                   help="use a seeded sample of this many corpus documents as the corpus "
                        "(sources and mining); default: all 5,183 (embedding them all takes "
                        "long on a shared 2-core CPU)")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "remixer_scifact"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--sources", type=int, default=None, help="source documents (preset default)")
    p.add_argument("--top-k", type=int, default=None, help="candidates per query")
    p.add_argument("--pool-k", type=int, default=None, metavar="N",
                   help="teacher ranks kept unjudged for NV-Retriever negatives (preset default: "
                        "cpu 30, gpu none: the 100 judged candidates suffice); 0: none")
    p.add_argument("--constrain-judge", action=argparse.BooleanOptionalAction, default=None,
                   help="force the judge's answer to end in <score>N</score> (default: on for "
                        "cpu, off for gpu)")
    p.add_argument("--judge-analysis-chars", type=int, default=None, metavar="N",
                   help="with --constrain-judge: characters of analysis allowed before the score "
                        "tag (default: twice the judge's token cap; 0 = the score alone, the "
                        "cheapest judgement on a CPU)")
    p.add_argument("--query-tokens", type=int, default=None, help="writer's max tokens per query")
    p.add_argument("--reason-tokens", type=int, default=None,
                   help="max tokens per reasoning query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any remixer config override, e.g. annotation.sampling.max_tokens=256")
    p.add_argument("--restart", action="store_true", help="discard earlier shards")
    p.add_argument("--examples", type=int, default=5)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--markdown", default=None, help="write the report tables as Markdown here")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    engine = dict(preset["engine"])
    writer = {"backend": "vllm", "model": args.writer, "seed": args.seed, **engine}
    judge = {**writer, "model": args.judge or args.writer}
    embedder = {"backend": "vllm", "runner": "pooling", "model": args.embedder,
                "pooling_type": args.pooling, "max_model_len": args.embedder_max_len,
                "gpu_memory_utilization": engine["gpu_memory_utilization"],
                "enforce_eager": engine["enforce_eager"], "dtype": engine["dtype"],
                "use_chat": False, "max_num_seqs": 32 if args.preset == "cpu" else None}
    constrain = args.constrain_judge if args.constrain_judge is not None else \
        args.preset == "cpu"
    words = args.judge_analysis_chars  # characters of analysis allowed before the tag
    if words is not None and words < 0:
        raise SystemExit("error: --judge-analysis-chars must be >= 0")
    judge_tokens = preset["judge_tokens"]
    if words is None:
        words = judge_tokens * 2
    elif constrain:
        judge_tokens = min(judge_tokens, words // 2 + 16)  # room for the tag after the analysis
    dataset = pathlib.Path(args.dataset_dir)
    top_k = args.top_k or preset["top_k"]
    pool_k = preset["pool_k"] if args.pool_k is None else (args.pool_k or None)
    if pool_k is not None and pool_k < top_k:
        raise SystemExit(f"error: --pool-k ({pool_k}) must be >= --top-k ({top_k}), or 0")
    return {
        "seed": args.seed,
        "shard_size": preset["shard_size"],
        "keep_engines": True,  # writer = judge by default: one engine, plus the embedder
        "data": {"corpus": str(corpus_file(args)),
                 "exclude_ids": [str(dataset / "synthesis_exclude_doc_ids.txt")]},
        "models": {"writer": writer, "judge": judge, "embedder": embedder},
        "sources": {"min_chars": 200, "max_chars": 5000,
                    "sample_size": args.sources or preset["sources"]},
        "queries": {"sampling": {"max_tokens": args.query_tokens or preset["query_tokens"]}},
        "mining": {"top_k": top_k, "pool_k": pool_k},
        # judged negatives are replaced by NV-Retriever's: a query needs only a judged positive
        # when a deeper teacher pool supplies its negatives
        "split": {"require_judged_negative": pool_k is None},
        "annotation": {"sampling": {
            "max_tokens": judge_tokens,
            "regex": (f"[\\s\\S]{{0,{words}}}<score>[1-5]</score>" if words else
                      "<score>[1-5]</score>") if constrain else None},
            "max_document_chars": preset["judge_doc_chars"]},
        "reasoning": {"input": "nv_negatives",
                      "sampling": {"max_tokens": args.reason_tokens or preset["reason_tokens"]}},
    }


def corpus_file(args: argparse.Namespace) -> pathlib.Path:
    """The SciFact corpus, or (``--corpus-docs N``) a seeded sample of N of its documents written
    to the work dir (every line kept verbatim)."""
    full = pathlib.Path(args.dataset_dir) / "corpus.jsonl"
    if not args.corpus_docs:
        return full
    import random

    lines = full.read_text(encoding="utf-8").splitlines()
    keep = sorted(random.Random(args.seed).sample(range(len(lines)), min(args.corpus_docs,
                                                                         len(lines))))
    out = pathlib.Path(args.work_dir) / f"corpus_{len(keep)}.jsonl"
    out.write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return out


def stage_rows(summaries: dict) -> list[dict]:
    """One row per stage with the figures the report shows."""
    rows = []
    for stage in STAGE_ORDER:
        s = summaries.get(stage)
        if s is None:
            continue
        rows.append({
            "stage": stage,
            "items_in": s.get("items_in"),
            "items_out": s.get("records_final", s.get("items_out")),
            "tokens": s.get("tokens_generated", 0),
            "tokens_per_s": s.get("tokens_per_s"),
            "parse_failures": s.get("llm_parse_failures", 0),
            "final_failures": s.get("llm_final_failures", 0),
            "hit_max_tokens": s.get("answers_hit_max_tokens", 0),
            "elapsed_s": s.get("elapsed_s"),
            "engine_startup_s": s.get("engine_startup_s"),
            "pos_per_query": s.get("pos_per_query"),
            "neg_per_query": s.get("neg_per_query"),
        })
    return rows


def score_histogram(summaries: dict) -> dict:
    a = summaries.get("annotations", {})
    hist = {str(k): a.get(f"label_{k}", 0) for k in range(1, 6)}
    hist["unparsable"] = a.get("label_unparsable", 0)
    return hist


def examples(work: pathlib.Path, n: int) -> list[dict]:
    path = work / "reasoning" / "final.jsonl"
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            out.append({"query": rec["query"], "reasoning_query": rec.get("reasoning_query"),
                        "positive": rec["pos"][0]})
            if len(out) == n:
                break
    return out


def leakage_check(work: pathlib.Path, dataset: pathlib.Path) -> dict:
    """Independent re-check of the no-leakage rule on the written sources."""
    excluded = set((dataset / "synthesis_exclude_doc_ids.txt").read_text().split())
    chosen = [json.loads(line)["id"]
              for line in (work / "sources" / "final.jsonl").read_text().splitlines()]
    leaked = sorted(set(chosen) & excluded)
    if leaked:
        raise SystemExit(f"leakage: sources {leaked[:5]} are held-out test gold documents")
    return {"sources": len(chosen), "excluded_ids": len(excluded), "leaked": 0}


def markdown(report: dict) -> str:
    cols = ("stage", "items_in", "items_out", "tokens", "tokens_per_s", "parse_failures",
            "hit_max_tokens", "elapsed_s", "engine_startup_s", "pos_per_query", "neg_per_query")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["stages"]:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in cols) + " |")
    hist = report["score_histogram"]
    lines += ["", "judge scores: " + ", ".join(f"{k}: {v}" for k, v in hist.items()), ""]
    for i, ex in enumerate(report["examples"], 1):
        lines += [f"**Example {i}**", "", f"- query: {ex['query']!r}",
                  f"- reasoning query: {ex['reasoning_query']!r}",
                  f"- positive: {ex['positive'][:400]!r}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm_cache"))
    if args.preset == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # one engine step can take minutes on a shared 2-core CPU (default limit 300 s)
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    from remixer.cli import main as remixer_main

    config_path = work / "config.json"
    config_path.write_text(json.dumps(build_config(args), indent=1))
    load_before = os.getloadavg()
    start = time.perf_counter()
    cmd = ["pipeline", "--config", str(config_path), "--work-dir", str(work),
           "--domain", "scifact", *[a for s in args.overrides for a in ("--set", s)]]
    if args.restart:
        cmd.append("--restart")
    code = remixer_main(cmd)
    wall = time.perf_counter() - start
    if code != 0:
        return code
    summaries = json.loads((work / "pipeline_summary.json").read_text())
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "writer": args.writer, "judge": args.judge or args.writer, "embedder": args.embedder,
        "preset": args.preset, "wall_s": round(wall, 1),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "leakage": leakage_check(work, pathlib.Path(args.dataset_dir)),
        "stages": stage_rows(summaries),
        "score_histogram": score_histogram(summaries),
        "examples": examples(work, args.examples),
    }
    text = markdown(report)
    print(text)
    print(f"wall {report['wall_s']} s; load average {report['load_avg_before']} -> "
          f"{report['load_avg_after']} on {report['cpu_count']} CPUs")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    if args.markdown:
        pathlib.Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
