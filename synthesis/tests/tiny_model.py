"""Builds a tiny random-weight Qwen3 (head_dim 32) with the real Qwen3 tokenizer, for plumbing tests
of the real vLLM engine. Its output text is meaningless."""

from __future__ import annotations

import pathlib
import shutil
import sys


def build_tiny_qwen3(out_dir: str | pathlib.Path, tokenizer_dir: str | pathlib.Path,
                     seed: int = 0) -> pathlib.Path:
    """Writes config.json, model.safetensors and the tokenizer files into ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        src = pathlib.Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy(src, out_dir / name)
    return out_dir


if __name__ == "__main__":
    build_tiny_qwen3(sys.argv[1], sys.argv[2])
