"""Tokens/s of ``reasonembed_jax.encode`` against HF transformers + PyTorch on the same model.

A random mid-size Qwen3 (hidden 512, 8 layers by default) is written once as an HF folder; both
sides embed the same texts (real BRIGHT queries, truncated to --max-length tokens) with
last-token pooling, and the table prints tokens/s and the ratio ours / PyTorch. The
implementations alternate repeat by repeat (background load hits all alike); best time counts.
Tokens/s counts real (non-padding) tokens, the same number for every row.

``--ablation`` adds our encoder with each optimisation switched off: the full final layer (no
last-token shortcut) and/or power-of-two length buckets (``text.DEFAULT_BUCKETS``).

    python benchmarks/encode_throughput.py [--texts 256] [--max-length 256] [--batch-size 32]
        [--ablation]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def load_texts(n: int) -> list[str]:
    texts = []
    for f in sorted((SHARED / "bright" / "examples").glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as fh:
            for line in fh:
                obj = json.loads(line)
                texts.append(obj["query"] + "\n" + obj.get("gold_answer", ""))
    return (texts * (n // len(texts) + 1))[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--ablation", action="store_true",
                        help="also time ours without the last-token shortcut / finer buckets")
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from reasonembed_jax import hf_io
    from reasonembed_jax.encode import TextEncoder
    from reasonembed_jax.model.pooling import pool
    from reasonembed_jax.text import DEFAULT_BUCKETS

    class FullForwardEncoder(TextEncoder):
        """Ablation: pools the full ``[B, T, D]`` hidden states (the last layer for every
        position), as before the last-token shortcut."""

        def _embed_impl(self, params, input_ids, mask):  # noqa: ANN001, ANN202
            model = dataclasses.replace(self.model, params=params)
            return pool(model(input_ids, mask), mask, self.pooling, normalize=self.normalize,
                        dim=self.dim)

    cfg = json.loads((SHARED / "hf_configs" / "Qwen3-0.6B" / "config.json").read_text())
    cfg.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
               num_key_value_heads=max(args.hidden // 128, 1), head_dim=64)
    texts = load_texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        src = pathlib.Path(tmp) / "src"
        Qwen3Model(Qwen3Config(**cfg)).save_pretrained(src)
        model = hf_io.load_encoder(src)
        out = pathlib.Path(tmp) / "model"
        hf_io.export_hf(model.params, model.config, out,
                        tokenizer_dir=SHARED / "qwen3_tokenizer", max_length=args.max_length)
        del model

        encoder = TextEncoder.from_pretrained(out, batch_size=args.batch_size,
                                              max_length=args.max_length, dtype=args.dtype)
        n_tokens = sum(len(r) for r in encoder.tokenize(texts))
        ours_name = "reasonembed-jax encode"
        impls = {ours_name: lambda: encoder.encode(texts, progress=False)}
        if args.ablation:
            def variant(cls: type, buckets: tuple[int, ...]):  # noqa: ANN202
                enc = cls(encoder.model, encoder.tokenizer, max_length=args.max_length,
                          batch_size=args.batch_size, mesh=encoder.mesh, buckets=buckets)
                return lambda: enc.encode(texts, progress=False)

            impls[ours_name + ", pow2 buckets"] = variant(TextEncoder, DEFAULT_BUCKETS)
            impls[ours_name + ", full last layer"] = variant(FullForwardEncoder,
                                                             encoder.buckets)
            impls[ours_name + ", full last layer + pow2 buckets (before)"] = variant(
                FullForwardEncoder, DEFAULT_BUCKETS)

        torch_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
        ref_model = Qwen3Model.from_pretrained(out, dtype=torch_dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
        tokenizer.padding_side = "left"

        def torch_encode() -> np.ndarray:
            outs = []
            # Same length-sorted batching as ours, so the comparison is of the model code.
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            for s in range(0, len(texts), args.batch_size):
                idx = order[s:s + args.batch_size]
                batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                  max_length=args.max_length, return_tensors="pt")
                with torch.inference_mode():
                    h = ref_model(**batch).last_hidden_state[:, -1].float()
                outs.append((idx, torch.nn.functional.normalize(h, dim=-1).numpy()))
            result = np.zeros((len(texts), args.hidden), np.float32)
            for idx, e in outs:
                result[idx] = e
            return result

        torch_name = f"HF transformers + torch {torch.__version__}"
        impls = {torch_name: torch_encode, **impls}
        results = {k: f() for k, f in impls.items()}  # warm-up: compiles every bucket shape
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(args.repeats):
            for k, f in impls.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        ref = results[torch_name]

    cos = min(float((results[k] * ref).sum(1).min()) for k in results)
    best = {k: min(v) for k, v in times.items()}
    print(f"\nencode throughput: Qwen3 hidden {args.hidden}, {args.layers} layers, "
          f"{args.texts} texts, {n_tokens} tokens (max {args.max_length}), batch "
          f"{args.batch_size}, {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print("| implementation | best time (s) | tokens/s | ratio |")
    print("|---|---|---|---|")
    for k, t in best.items():
        print(f"| {k} | {t:.2f} | {n_tokens / t:,.0f} | {best[torch_name] / t:.2f} |")
    print(f"min cosine between each of ours and the PyTorch embeddings: {cos:.6f}")


if __name__ == "__main__":
    main()
