"""One encoder interface over both model families: decoders (Qwen3, Qwen2, Llama-3.x) and BERT.

``config_from_hf`` picks the family from ``model_type``; ``forward`` runs either to final hidden
states and ``embed`` to pooled embeddings. Parameters are plain ``{dotted path: array}`` dicts (rows
of ``params.param_specs``). Everything above this module (HF import/export, ``encode``, training,
evaluation) goes through it and never needs to know which family it holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Union

import jax
from jax.sharding import Mesh

from reasonembed_jax.model.bert import BERT_MODEL_TYPES, BertConfig, bert_forward
from reasonembed_jax.model.config import SUPPORTED_MODEL_TYPES, DecoderConfig
from reasonembed_jax.model.decoder import ProjectFn, decoder_forward, default_project
from reasonembed_jax.model.params import init_param_value, param_specs
from reasonembed_jax.model.pooling import finish_pooled, last_token_pool, pool
from reasonembed_jax.model.sharding import DEFAULT_RULES, Rules

Array = jax.Array
ModelConfig = Union[DecoderConfig, BertConfig]  # noqa: UP007 (a runtime alias)
MODEL_TYPES = SUPPORTED_MODEL_TYPES + BERT_MODEL_TYPES


def config_from_hf(hf: dict[str, Any], **runtime: Any) -> ModelConfig:
    """The family's config for an HF ``config.json`` dict (by its ``model_type``)."""
    model_type = hf.get("model_type")
    if model_type in BERT_MODEL_TYPES:
        return BertConfig.from_hf(hf, **runtime)
    if model_type in SUPPORTED_MODEL_TYPES:
        return DecoderConfig.from_hf(hf, **runtime)
    raise ValueError(f"config.json has model_type '{model_type}'; supported: {MODEL_TYPES}")


def config_from_hf_dir(path: str | os.PathLike, **runtime: Any) -> ModelConfig:
    """``config_from_hf`` on ``path/config.json``. For BERT, whether the checkpoint carries HF's
    pooler layer is read from its tensor names."""
    config_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(config_path) as f:
        hf = json.load(f)
    if hf.get("model_type") in BERT_MODEL_TYPES and "with_pooler" not in runtime:
        runtime["with_pooler"] = checkpoint_has_pooler(path)
    return config_from_hf(hf, **runtime)


def checkpoint_has_pooler(path: str | os.PathLike) -> bool:
    from reasonembed_jax.safetensors_io import CheckpointReader

    try:
        keys = CheckpointReader(path).keys()
    except (FileNotFoundError, ValueError):
        return True  # no weights yet (e.g. a config-only folder): HF's BertModel default
    return any(k.endswith("pooler.dense.weight") for k in keys)


def forward(
    config: ModelConfig,
    params: Mapping[str, Array],
    input_ids: Array,
    attention_mask: Array,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    project: ProjectFn = default_project,
    last_token_only: bool = False,
    dropout_key: Array | None = None,
) -> Array:
    """Final hidden states ``[B, T, hidden]`` of either family (``[B, hidden]`` at each row's
    last real token with ``last_token_only``). ``dropout_key`` turns on the BERT family's dropout;
    decoders have none."""
    if isinstance(config, BertConfig):
        hidden = bert_forward(config, params, input_ids, attention_mask, mesh=mesh, rules=rules,
                              project=project, dropout_key=dropout_key)
        return last_token_pool(hidden, attention_mask) if last_token_only else hidden
    if dropout_key is not None:
        raise ValueError("dropout is implemented for the BERT family only; decoders train "
                         "without it (set model.dropout=False)")
    return decoder_forward(config, params, input_ids, attention_mask, mesh=mesh, rules=rules,
                           project=project, last_token_only=last_token_only)


def init_params(config: ModelConfig, seed: int | Array = 0) -> dict[str, Array]:
    """Random parameters of the table: row ``i`` drawn with ``fold_in(key(seed), i)``."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return {path: init_param_value(spec, jax.random.fold_in(key, i), config)
            for i, (path, spec) in enumerate(param_specs(config).items())}


def embed(
    config: ModelConfig,
    params: Mapping[str, Array],
    input_ids: Array,
    attention_mask: Array,
    *,
    pooling: str = "last_token",
    normalize: bool = True,
    dim: int | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    project: ProjectFn = default_project,
    dropout_key: Array | None = None,
) -> Array:
    """Token ids -> ``[B, dim or hidden]`` float32 embeddings: ``forward``, pooling, Matryoshka
    truncation to ``dim``, L2 normalisation. The one embedding function: the training step,
    ``TextEncoder`` (and through it evaluation and mining) all call it. Last-token pooling runs
    the decoder's last layer for the pooled position only."""
    if pooling == "last_token":
        pooled = forward(config, params, input_ids, attention_mask, mesh=mesh, rules=rules,
                         project=project, last_token_only=True, dropout_key=dropout_key)
        return finish_pooled(pooled, normalize=normalize, dim=dim)
    hidden = forward(config, params, input_ids, attention_mask, mesh=mesh, rules=rules,
                     project=project, dropout_key=dropout_key)
    return pool(hidden, attention_mask, pooling, normalize=normalize, dim=dim)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A model config with its parameters (``{dotted table path: array}``), as
    ``hf_io.load_encoder`` returns it. Calling it runs ``forward``; ``embed`` pools."""

    config: ModelConfig
    params: dict[str, Array]
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES

    def __call__(self, input_ids: Array, attention_mask: Array, *,
                 last_token_only: bool = False) -> Array:
        """Final hidden states ``[B, T, hidden]`` (``[B, hidden]`` at each row's last real token
        with ``last_token_only``)."""
        return forward(self.config, self.params, input_ids, attention_mask, mesh=self.mesh,
                       rules=self.rules, last_token_only=last_token_only)
