"""Tiny random HF (PyTorch) reference models built from the real configs in shared/data."""

from __future__ import annotations

import json
import pathlib

import torch

# Small widths that keep every architectural feature: explicit head_dim != hidden/heads for
# Qwen3, GQA (4 query heads on 2 kv heads), 2 layers.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

FAMILIES = {
    # name: (real config folder, overrides)
    "qwen3": ("Qwen3-0.6B", dict(head_dim=32)),
    "qwen2": ("Qwen3-0.6B", dict(model_type="qwen2", head_dim=None)),
    "llama": ("Llama-3.1-8B", dict(vocab_size=512)),
}


def tiny_hf_config(hf_configs_dir: pathlib.Path, family: str, **extra) -> dict:
    folder, overrides = FAMILIES[family]
    cfg = json.loads((hf_configs_dir / folder / "config.json").read_text())
    cfg.update(TINY)
    cfg.update(overrides)
    cfg.update(extra)
    if cfg.get("head_dim") is None:
        cfg.pop("head_dim", None)
    if family == "qwen2":
        cfg["architectures"] = ["Qwen2ForCausalLM"]
        for key in ("attention_bias", "head_dim"):
            cfg.pop(key, None)
    return cfg


def build_hf_model(cfg: dict, *, causal_lm: bool = False, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised HF model; every weight (norms and biases too) is random so a
    mis-mapped tensor cannot hide behind an all-ones or all-zeros initialisation."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.to(dtype)


def save_hf_model(model: torch.nn.Module, path: pathlib.Path, **kwargs) -> pathlib.Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path
