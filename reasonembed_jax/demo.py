"""The demo: train a tiny Qwen3 embedder on CPU, export it, and show that retrieval improved.

    python -m reasonembed_jax.demo --workdir runs/demo [--config configs/demo.py[:lora,gradcache]]

1. trains ``configs/demo.py`` (a 2-layer Qwen3 of width 64 with the real tokenizer, from
   scratch, RI-InfoNCE over the shipped BRIGHT-derived records; resumes if interrupted);
2. exports it to an HF + sentence-transformers folder (``workdir/export/latest``);
3. embeds each demo domain's queries (with their instruction) and positives with the untrained
   initialisation and with the trained export, and prints query -> own-positive top-1 accuracy.
The records are the training records, so step 3 shows that training works, not generalisation.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from reasonembed_jax.cli import run_cli


def _top1(encoder, records: list[dict]) -> float:  # noqa: ANN001
    q = encoder.encode([r["query"] for r in records], instruction=records[0]["prompt"],
                       progress=False)
    d = encoder.encode([r["pos"][0] for r in records], progress=False)
    return float(np.mean(np.argmax(q @ d.T, axis=1) == np.arange(len(records))))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reasonembed_jax.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--config", default="configs/demo.py", help="config file[:arg]")
    args = parser.parse_args(argv)

    from reasonembed_jax.encode import TextEncoder
    from reasonembed_jax.tiny_model import write_tiny_model
    from reasonembed_jax.training.config import load_config_file
    from reasonembed_jax.training.trainer import train

    config = load_config_file(args.config)
    start = time.perf_counter()
    result = train(config, args.workdir)
    trained_seconds = time.perf_counter() - start
    first = [h["loss"] for h in result["history"][:10]]
    last = [h["loss"] for h in result["history"][-10:]]
    print(f"\ntrained {result['final_step']} steps in {trained_seconds:.0f}s; mean loss of the "
          f"first 10 steps {np.mean(first):.3f} -> last 10 {np.mean(last):.3f}")

    export = os.path.join(args.workdir, "export", "latest")
    trained = TextEncoder.from_pretrained(export, max_length=128, batch_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        shrink = dict(config.model.shrink)
        write_tiny_model(config.model.hf_dir, tmp, tokenizer_dir=config.data.tokenizer,
                         layers=shrink["layers"], hidden=shrink["hidden"], heads=shrink["heads"],
                         kv_heads=shrink["kv_heads"], head_dim=shrink["head_dim"],
                         intermediate=shrink.get("intermediate"), seed=config.train.seed,
                         append_eos=bool(config.data.append_eos))
        untrained = TextEncoder.from_pretrained(tmp, max_length=128, batch_size=16)
        print(f"\n{'domain':<20} {'queries':>7} {'untrained top-1':>16} {'trained top-1':>14}")
        folder = os.path.dirname(config.data.sources[0])
        for path in sorted(glob.glob(os.path.join(folder, "*.jsonl.gz"))):
            with gzip.open(path, "rt") as f:
                records = [json.loads(line) for line in f]
            name = os.path.basename(path).split(".")[0]
            print(f"{name:<20} {len(records):>7} {_top1(untrained, records):>16.3f} "
                  f"{_top1(trained, records):>14.3f}")
    print(f"\nexported model: {export} (loads with transformers.AutoModel and "
          "sentence_transformers.SentenceTransformer)")
    return 0


if __name__ == "__main__":
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    run_cli(main)
