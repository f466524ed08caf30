"""Write a randomly initialised HF model folder shrunk from a real config (for demos and tests).

    python -m reasonembed_jax.tiny_model --config ../shared/data/hf_configs/Qwen3-0.6B \\
        --tokenizer ../shared/data/qwen3_tokenizer --out /tmp/tiny-qwen3 \\
        [--layers 2] [--hidden 64] [--heads 4] [--kv-heads 2] [--head-dim 32] [--seed 0]

The architecture (family, norms, biases, rope settings, vocabulary) is the real one; only the
sizes shrink. No PyTorch needed: the model is initialised in JAX and written by our exporter.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from reasonembed_jax.cli import run_cli
from reasonembed_jax.hf_io import export_hf
from reasonembed_jax.model.encoder import config_from_hf, init_params


def shrink_hf_config(
    hf: dict, *, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int | None,
    intermediate: int | None = None,
) -> dict:
    """A copy of the HF config dict with smaller sizes and everything else kept."""
    out = dict(hf)
    out.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
               intermediate_size=intermediate or (4 if hf.get("model_type") == "bert" else 3)
               * hidden)
    if hf.get("model_type") == "bert":  # no GQA and no explicit head_dim in the BERT family
        return out
    out["num_key_value_heads"] = kv_heads
    if head_dim is not None:
        out["head_dim"] = head_dim
    elif "head_dim" in out:
        out["head_dim"] = hidden // heads
    if "max_window_layers" in out:
        out["max_window_layers"] = layers
    out.pop("layer_types", None)
    return out


def write_tiny_model(
    config_dir: str, out_dir: str, *, tokenizer_dir: str | None, layers: int = 2,
    hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int | None = 32,
    intermediate: int | None = None, seed: int = 0, append_eos: bool = False,
) -> str:
    with open(os.path.join(config_dir, "config.json")) as f:
        hf = json.load(f)
    hf = shrink_hf_config(hf, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim, intermediate=intermediate)
    hf["torch_dtype"] = "float32"
    config = config_from_hf(hf)
    return export_hf(init_params(config, seed), config, out_dir, tokenizer_dir=tokenizer_dir,
                     append_eos=append_eos)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reasonembed_jax.tiny_model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="folder with a real HF config.json")
    parser.add_argument("--out", required=True, help="output HF folder")
    parser.add_argument("--tokenizer", default=None, help="folder with tokenizer files to copy")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32,
                        help="explicit head_dim (0: hidden / heads)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (3 x hidden)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append-eos", action="store_true",
                        help="export with an EOS-appending tokenizer (Qwen3-Embedding style)")
    args = parser.parse_args(argv)
    out = write_tiny_model(
        args.config, args.out, tokenizer_dir=args.tokenizer, layers=args.layers,
        hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim or None, intermediate=args.intermediate, seed=args.seed,
        append_eos=args.append_eos,
    )
    print(f"wrote a random {args.layers}-layer model to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
