"""``remixer`` command line: one subcommand per stage, plus ``pipeline`` and ``exclusions``.

    python -m remixer queries --config cfg.json --work-dir runs/biology --domain biology \\
        --set models.writer.model=/models/Qwen2.5-72B-Instruct \\
        --set models.writer.tensor_parallel_size=4

Each stage reads ``<work-dir>/<previous stage>/final.jsonl`` and writes ``<work-dir>/<stage>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from remixer import prompts as P
from remixer.config import ConfigError, load_config
from remixer.stages import STAGE_FUNCTIONS, BackendPool, Context, run_pipeline
from remixer.store import StageError, atomic_write_text

STAGE_HELP = {
    "filter": "stage 0: keep corpus passages an LLM judges to be in the domain (Yes/No)",
    "sources": "stage 1: pick source documents (length bounds, sample size, no benchmark gold)",
    "queries": "stage 2: one query per source, with a sampled length and education level",
    "candidates": "stage 3: embed queries and corpus with a vLLM pooling model; top-k per "
                  "query, source document and query-identical texts excluded",
    "annotations": "stage 4: 1-5 relevance of each candidate from <score>..</score>",
    "split": "stage 5: pos (>= 3) and neg (1-2); queries without both dropped",
    "nv_negatives": "NV-Retriever positive-aware negatives (TopK-PercPos / TopK-MarginPos) "
                    "from the mined candidates",
    "reasoning": "stage 6: reasoning query q' per record; writes the validated training file",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=pathlib.Path, default=None,
                   help="JSON config file (defaults in remixer/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set queries.sampling.temperature=0.8 "
                        "(value parsed as JSON when possible); repeatable")
    p.add_argument("--work-dir", type=pathlib.Path, required=True,
                   help="folder holding one subfolder per stage")
    p.add_argument("--domain", required=True, help="domain key from remixer/domains.json")
    p.add_argument("--domains-file", type=pathlib.Path, default=None,
                   help="another domains.json of the same layout")
    p.add_argument("--corpus", default=None, help="shortcut for --set data.corpus=PATH")
    p.add_argument("--exclude-ids", action="append", default=None, metavar="PATH",
                   help="benchmark gold-id file (or BRIGHT examples .jsonl.gz); repeatable")
    p.add_argument("--exclude-texts", action="append", default=None, metavar="PATH",
                   help="JSONL of benchmark gold texts (gold_answer/text); repeatable")
    p.add_argument("--worker-index", type=int, default=0,
                   help="this worker's index when shards are split over several engines")
    p.add_argument("--num-workers", type=int, default=1,
                   help="number of workers sharing the shards (shard i -> worker i %% N)")
    p.add_argument("--restart", action="store_true",
                   help="discard this stage's earlier shards instead of resuming")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remixer", description="ReMixer synthesis of reasoning-intensive retrieval "
        "training data (vLLM offline engine or OpenAI-compatible server).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in STAGE_HELP.items():
        _add_common(sub.add_parser(name.replace("_", "-"), help=text, description=text))
    pipe = sub.add_parser("pipeline", help="run every stage in order",
                          description="Run stages 0 (if filter.enabled) to 6 in order, "
                          "resuming whatever is already done.")
    _add_common(pipe)
    excl = sub.add_parser("exclusions", help="write the benchmark gold ids of BRIGHT example "
                          "files, one per line", description="Collect gold_ids and "
                          "gold_ids_long from BRIGHT example files (.jsonl / .jsonl.gz).")
    excl.add_argument("inputs", nargs="+", type=pathlib.Path)
    excl.add_argument("--out", type=pathlib.Path, required=True)
    cfg = sub.add_parser("show-config", help="print the merged configuration",
                         description="Print defaults + config file + overrides as JSON.")
    cfg.add_argument("--config", type=pathlib.Path, default=None)
    cfg.add_argument("--set", dest="overrides", action="append", default=[])
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if getattr(args, "corpus", None):
        out.append(f"data.corpus={json.dumps(args.corpus)}")
    if getattr(args, "exclude_ids", None):
        out.append(f"data.exclude_ids={json.dumps(args.exclude_ids)}")
    if getattr(args, "exclude_texts", None):
        out.append(f"data.exclude_texts={json.dumps(args.exclude_texts)}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "exclusions":
            from remixer.stages import load_exclusion_ids

            ids = sorted(load_exclusion_ids(args.inputs))
            atomic_write_text(args.out, "".join(i + "\n" for i in ids))
            print(f"wrote {len(ids)} ids to {args.out}")
            return 0
        config = load_config(args.config, _overrides(args))
        if args.command == "show-config":
            print(json.dumps(config, indent=2, sort_keys=True))
            return 0
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        domain = P.load_domain(args.domain, args.domains_file)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        ctx = Context(config=config, work_dir=args.work_dir, domain=domain,
                      backends=BackendPool(config["models"],
                                           keep_alive=bool(config["keep_engines"])),
                      worker_index=args.worker_index, num_workers=args.num_workers,
                      restart=args.restart)
        if args.command == "pipeline":
            run_pipeline(ctx)
        else:
            try:
                STAGE_FUNCTIONS[args.command.replace("-", "_")](ctx)
            finally:
                ctx.backends.close()
        return 0
    except (ConfigError, StageError, P.PromptError) as err:
        print(f"remixer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
