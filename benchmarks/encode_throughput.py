"""Tokens/s of ``reasonembed_jax.encode`` against HF transformers + PyTorch on the same model.

A random mid-size Qwen3 (hidden 512, 8 layers by default) is written once as an HF folder; both
sides embed the same texts (real BRIGHT queries, truncated to --max-length tokens) with
last-token pooling, and the table prints tokens/s and the ratio ours / PyTorch.

    python benchmarks/encode_throughput.py [--texts 256] [--max-length 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from reasonembed_jax import hf_io
    from reasonembed_jax.encode import TextEncoder

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
        hf_io.export_hf(hf_io.get_params(model), model.config, out,
                        tokenizer_dir=SHARED / "qwen3_tokenizer", max_length=args.max_length)
        del model

        encoder = TextEncoder.from_pretrained(out, batch_size=args.batch_size,
                                              max_length=args.max_length, dtype=args.dtype)
        n_tokens = sum(len(r) for r in encoder.tokenize(texts))
        encoder.encode(texts, progress=False)  # compile every bucket shape
        ours_t = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = encoder.encode(texts, progress=False)
            ours_t.append(time.perf_counter() - start)

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

        torch_encode()  # warm-up
        torch_t = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ref = torch_encode()
            torch_t.append(time.perf_counter() - start)

    cos = float((ours * ref).sum(1).min())
    ours_tps, torch_tps = n_tokens / min(ours_t), n_tokens / min(torch_t)
    print(f"\nencode throughput: Qwen3 hidden {args.hidden}, {args.layers} layers, "
          f"{args.texts} texts, {n_tokens} tokens (max {args.max_length}), batch "
          f"{args.batch_size}, {args.dtype}, torch threads {torch.get_num_threads()}")
    print("| implementation | best time (s) | tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| HF transformers + torch {torch.__version__} | {min(torch_t):.2f} | "
          f"{torch_tps:,.0f} | 1.00 |")
    print(f"| reasonembed-jax encode | {min(ours_t):.2f} | {ours_tps:,.0f} | "
          f"{ours_tps / torch_tps:.2f} |")
    print(f"min cosine between the two embeddings: {cos:.6f}")


if __name__ == "__main__":
    main()
