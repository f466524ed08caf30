"""Decoder configuration: one dataclass covering Qwen3, Qwen2 and Llama-3.x, built from HF configs."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
POOLING_MODES = ("last_token", "mean", "first_token")
ATTENTION_MODES = ("causal", "bidirectional")
REMAT_POLICIES = ("none", "full", "dots", "save_projections")
ATTENTION_IMPLS = ("auto", "matmul", "xla", "cudnn")

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def resolve_dtype(name: str | Any) -> Any:
    """Maps 'float32' / 'bf16' / a numpy dtype to a jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype '{name}'; choose one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return jnp.dtype(name)


class RuntimeFields:
    """What every family's config dataclass shares: ``replace`` and the resolved dtypes."""

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    @property
    def jnp_dtype(self) -> Any:
        return resolve_dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> Any:
        return resolve_dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class DecoderConfig(RuntimeFields):
    """Architecture of a decoder backbone plus run-time choices (dtypes, attention, remat).

    Architecture fields mirror the HF config; ``hf_config`` keeps the original dict so export writes
    back every field we do not model.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict[str, Any] | None = None
    qk_norm: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    # Run-time choices (not part of the HF architecture).
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "causal"
    # How attention runs (decoder.ATTENTION_IMPLS): auto | matmul | xla | cudnn.
    attention_impl: str = "auto"
    scan_layers: bool = True
    remat_policy: str = "none"
    hf_config: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type '{self.model_type}'; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got '{self.attention}'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {REMAT_POLICIES}, got '{self.remat_policy}'"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got '{self.attention_impl}'")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        resolve_dtype(self.param_dtype)
        resolve_dtype(self.dtype)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ValueError(f"unsupported rope scaling type '{kind}' (supported: llama3)")

    mlp_matrices = 3  # gate, up and down (SwiGLU)
    padding_side = "left"  # exported tokenizers pad left (last-token pooling reads the end)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **runtime: Any) -> DecoderConfig:
        """Builds the config from an HF ``config.json`` dict (Qwen3, Qwen2 or Llama)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type '{model_type}'; supported: {SUPPORTED_MODEL_TYPES}"
            )
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        # transformers >= 5 may nest rope settings in "rope_parameters".
        rope_parameters = hf.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            rope_theta = rope_theta or rope_parameters.get("rope_theta")
            if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = rope_parameters
        if rope_scaling is not None and rope_scaling.get(
            "rope_type", rope_scaling.get("type")
        ) == "default":
            rope_scaling = None
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            qk_norm=model_type == "qwen3",
            # Qwen2 always has q/k/v biases; Qwen3 and Llama read attention_bias.
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            initializer_range=hf.get("initializer_range", 0.02),
            hf_config=dict(hf),
            **runtime,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, **runtime: Any) -> DecoderConfig:
        config_path = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {path}")
        with open(config_path) as f:
            return cls.from_hf(json.load(f), **runtime)

    def to_hf(self, *, torch_dtype: str | None = None) -> dict[str, Any]:
        """The HF config dict of the base model (``*Model`` architecture) for export."""
        hf = dict(self.hf_config or {})
        arch = {"qwen3": "Qwen3Model", "qwen2": "Qwen2Model", "llama": "LlamaModel"}
        hf.update(
            model_type=self.model_type,
            architectures=[arch[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
        )
        hf.pop("rope_parameters", None)
        if self.model_type != "llama" or self.head_dim != self.hidden_size // self.num_heads:
            hf["head_dim"] = self.head_dim
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if torch_dtype is not None:
            hf["torch_dtype"] = torch_dtype
        return hf
