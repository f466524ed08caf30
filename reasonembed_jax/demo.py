"""The demo: a tiny random Qwen3 embedder, exported to HF format, embedding real BRIGHT text.

    python -m reasonembed_jax.demo --workdir runs/demo [--shared ../shared/data]

It exercises the whole encoder path on CPU in well under a minute: build a model from the real
Qwen3 config (shrunk), export it (HF + sentence-transformers files), load it back with
``TextEncoder``, embed BRIGHT biology queries (with their instruction) and gold answers, and
print how often each query's own answer ranks first. The weights are random, so the score is
near chance; training (``reasonembed_jax.train``) is what moves it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from reasonembed_jax.encode import TextEncoder
from reasonembed_jax.tiny_model import write_tiny_model

INSTRUCTION = "Given a Biology post, retrieve relevant passages that help answer the post."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reasonembed_jax.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model_dir = os.path.join(args.workdir, "tiny-qwen3")
    write_tiny_model(os.path.join(args.shared, "hf_configs", "Qwen3-0.6B"), model_dir,
                     tokenizer_dir=os.path.join(args.shared, "qwen3_tokenizer"))
    with gzip.open(os.path.join(args.shared, "bright", "examples", "biology.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f][: args.queries]
    encoder = TextEncoder.from_pretrained(model_dir, max_length=256, batch_size=16)
    q = encoder.encode([r["query"] for r in rows], instruction=INSTRUCTION)
    d = encoder.encode([r["gold_answer"] for r in rows])
    top1 = float(np.mean(np.argmax(q @ d.T, axis=1) == np.arange(len(rows))))
    print(f"model: {model_dir}  embeddings: {q.shape[1]}-d, unit norm "
          f"{np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)}")
    print(f"query -> own gold answer top-1 among {len(rows)}: {top1:.3f} "
          f"(chance {1 / len(rows):.3f}); {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    raise SystemExit(main())
