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


# A hand-written BERT config (no real config file needed): every architectural feature of
# BertModel at a tiny width, max_position_embeddings small enough to test the length check.
TINY_BERT = dict(model_type="bert", architectures=["BertModel"], vocab_size=512, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
                 layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 initializer_range=0.02, pad_token_id=0, position_embedding_type="absolute")


def tiny_bert_config(**extra) -> dict:
    return {**TINY_BERT, **extra}


def build_hf_bert(cfg: dict, *, cls_name: str = "BertModel", seed: int = 0,
                  **model_kwargs) -> torch.nn.Module:
    """A randomly initialised HF BERT (``cls_name`` from transformers, e.g. ``BertForMaskedLM``);
    every weight is random, LayerNorm weights near 1 and everything else (LayerNorm biases,
    position and token-type embeddings, pooler) N(0, 0.08), so a mis-mapped or unused tensor
    changes the output. ``model_kwargs`` go to the constructor (``add_pooling_layer=False``)."""
    import transformers

    config = transformers.BertConfig(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config, **model_kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model
