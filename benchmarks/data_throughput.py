"""Throughput of the training-data pipeline with the real Qwen3 tokenizer and recipe-like shapes.

Builds a temporary data set from BRIGHT texts (queries, reasoning, full gold answers as passages)
with one domain per distinct (group size, per-device batch) shape of the recipe
(``configs/common.py: RECIPE_DOMAIN_SHAPES``), so every global batch holds ``8 * num_devices * 16``
passages, and times the Grain iterator for a few steps at each worker count. Prints records/s
(queries), passages/s, tokens/s (non-padding) and the trainer's consumption rate, which must stay
below the pipeline's.

    python benchmarks/data_throughput.py --num-devices 8 --worker-counts 0,1,2 \\
        --trainer-steps-per-sec <TRAINER RATE AT THE DEMO CONFIG>

It also times the data block of ``configs/demo.py`` (the demo's own data, its own device count),
the setting the trainer's rate is compared with. TRAINER RATE: pass ``--trainer-steps-per-sec``
(steps/s of the trainer at the demo config); without it the column prints 'n/a'.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import random
import sys
import tempfile
import time

import numpy as np
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import machine_line, warn_if_busy  # noqa: E402  (before anything imports JAX)
from reasonembed_jax.data import build_pipeline
from reasonembed_jax.training.config import load_config_file, load_module

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("REASONEMBED_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_CONFIG = REPO / "configs" / "demo.py"


def recipe_shapes() -> dict[str, tuple[int, int]]:
    """The first domain of each distinct (group size, per-device batch) of the recipe."""
    shapes = load_module(REPO / "configs" / "common.py").RECIPE_DOMAIN_SHAPES
    out: dict[str, tuple[int, int]] = {}
    for domain, shape in shapes.items():
        if shape not in out.values():
            out[domain] = shape
    return out


RECIPE = recipe_shapes()


def make_dataset(root: pathlib.Path, steps_per_domain: int, num_devices: int, seed: int) -> None:
    """Each domain gets enough records for ``steps_per_domain`` global batches per epoch, so the
    three shapes are equally represented; records carry ``min(G-1, 24)`` negatives."""
    examples = []
    for path in sorted((SHARED / "bright" / "examples").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            examples.extend(json.loads(line) for line in f)
    answers = [e["gold_answer"] for e in examples if len(e["gold_answer"]) > 100]
    usable = [e for e in examples if e.get("reasoning")]
    rng = random.Random(seed)
    for domain, (group, batch) in RECIPE.items():
        negatives = max(1, min(group - 1, 24))
        with open(root / f"{domain}.jsonl", "w") as f:
            for i in range(steps_per_domain * batch * num_devices):
                ex = usable[rng.randrange(len(usable))]
                f.write(json.dumps({
                    "id": f"{domain}-{i}",
                    "prompt": f"Given a {domain} post, retrieve relevant passages that help "
                              "answer the post",
                    "query": ex["query"],
                    "reasoning_query": ex["reasoning"],
                    "pos": [rng.choice(answers)],
                    "neg": rng.sample(answers, negatives),
                }) + "\n")


def measure(config: dict, steps: int, warmup: int) -> dict[str, float]:
    pipe = build_pipeline(config, process_index=0, process_count=1)
    it = pipe.iterator()
    for _ in range(warmup):
        next(it)
    queries = passages = tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        queries += batch["query_input_ids"].shape[0]
        passages += batch["passage_input_ids"].shape[0]
        tokens += int(sum(batch[k].sum() for k in batch if k.endswith("attention_mask")))
    seconds = time.perf_counter() - start
    it.close()
    return {"steps/s": steps / seconds, "records/s": queries / seconds,
            "passages/s": passages / seconds, "tokens/s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(SHARED / "qwen3_tokenizer"))
    parser.add_argument("--settings", default="recipe,demo",
                        help="recipe: recipe shapes and lengths on generated data; demo: "
                             "configs/demo.py's data on the shipped demo records")
    parser.add_argument("--num-devices", type=int, default=8,
                        help="recipe setting: devices the global batch is sized for "
                             "(default %(default)s; the demo setting keeps the demo's own)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: worker count + 1)")
    parser.add_argument("--worker-counts", default="0,1,2")
    parser.add_argument("--max-length", type=int, default=512,
                        help="recipe setting: query, passage and reasoning max length")
    parser.add_argument("--steps-per-domain", type=int, default=8,
                        help="recipe setting: global batches per domain and epoch")
    # ---- TRAINER RATE: steps/s of the trainer at the demo config; 'n/a' without it.
    parser.add_argument("--trainer-steps-per-sec", type=float, default=None,
                        help="TRAINER RATE (steps/s) at the demo config; 'n/a' when not given")
    args = parser.parse_args(argv)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    print(machine_line(), flush=True)
    warn_if_busy()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    workers_list = [int(w) for w in args.worker_counts.split(",")]
    demo = load_config_file(DEMO_CONFIG).data
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for setting in settings:
            if setting == "recipe":
                make_dataset(root, args.steps_per_domain, args.num_devices, seed=0)
                config = {
                    "sources": (str(root / "*.jsonl"),),
                    "tokenizer": args.tokenizer,
                    "domains": {d: {"group_size": g, "batch_size": b}
                                for d, (g, b) in RECIPE.items()},
                    "query_max_length": args.max_length,
                    "passage_max_length": args.max_length,
                    "reasoning_max_length": args.max_length,
                    "use_reasoning_query": True,
                    "num_devices": args.num_devices,
                }
            elif setting == "demo":
                config = {**demo.to_dict(), "tokenizer": args.tokenizer}
            else:
                raise SystemExit(f"unknown setting {setting!r}")
            config["max_steps"] = 10_000
            for workers in workers_list:
                warmup = args.warmup if args.warmup is not None else workers + 1
                result = measure({**config, "worker_count": workers}, args.steps, warmup)
                rows.append((setting, workers, result))
                print(f"{setting} workers={workers}: {result}", file=sys.stderr, flush=True)
    print(f"\ndata pipeline throughput: {machine_line()}; Qwen3 tokenizer, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    group, batch = next(iter(RECIPE.values()))
    print(f"  recipe: {args.num_devices} devices, shapes {RECIPE} (1 positive + G-1 negatives; "
          f"{group * batch * args.num_devices} passages/step), max length {args.max_length}, "
          "passages = full BRIGHT gold answers")
    print(f"  demo:   configs/demo.py, {demo.num_devices} device(s), (G, batch/device) = "
          f"({demo.group_size}, {demo.batch_size}), domains {demo.domains.to_dict()}; lengths "
          f"{demo.query_max_length}/{demo.passage_max_length}/{demo.reasoning_max_length}")
    trainer = args.trainer_steps_per_sec
    header = (f"{'setting':>7} | {'workers':>7} | {'steps/s':>8} | {'records/s':>9} | "
              f"{'passages/s':>10} | {'tokens/s':>10} | {'trainer steps/s':>15} | "
              f"{'headroom':>8}")
    print(header)
    print("-" * len(header))
    for setting, workers, r in rows:
        t = f"{trainer:.3f}" if trainer and setting == "demo" else "n/a"
        headroom = f"{r['steps/s'] / trainer:.1f}x" if t != "n/a" else "n/a"
        print(f"{setting:>7} | {workers:>7} | {r['steps/s']:>8.3f} | {r['records/s']:>9.1f} | "
              f"{r['passages/s']:>10.1f} | {r['tokens/s']:>10.0f} | {t:>15} | {headroom:>8}")
    demo_rates = [r["steps/s"] for setting, _, r in rows if setting == "demo"]
    if trainer and demo_rates:
        verdict = "OK" if max(demo_rates) > trainer else "PIPELINE IS THE BOTTLENECK"
        print(f"demo config: best pipeline rate {max(demo_rates):.3f} steps/s vs trainer "
              f"{trainer:.3f} steps/s: {verdict}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
