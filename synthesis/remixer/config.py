"""Pipeline configuration: a JSON file merged over the defaults below, then ``--set`` overrides.

Every key must already exist in ``DEFAULT_CONFIG`` (a typo is an error, not a silent no-op),
except under ``models`` where new named model entries may be added; each one is completed from
``MODEL_DEFAULTS``. A stage names the model it uses (``queries.model = "writer"``), so the query
writer, the relevance judge and the embedder can be different deployments.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from reasonembed_jax.retrieval import NV_METHODS

MODEL_DEFAULTS: dict[str, Any] = {
    # "vllm": the offline engine in this process; "openai": an OpenAI-compatible HTTP server
    # (e.g. `vllm serve`).
    "backend": "vllm",
    "model": "",
    "tokenizer": None,
    # Name sent in HTTP requests (defaults to ``model``).
    "served_model_name": None,
    # vLLM engine arguments (offline backend).
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
    "max_model_len": 8192,
    "enforce_eager": False,
    "dtype": "auto",
    "seed": 0,
    "max_num_seqs": None,
    "extra_engine_args": {},
    # "generate" for LLM stages, "pooling" for the embedder (last-token pooling, L2 normalised).
    "runner": "generate",
    "pooling_type": "LAST",
    "normalize": True,
    # Chat formatting: prompts are sent as one user message through the model's chat template.
    "use_chat": True,
    "chat_template_kwargs": {},
    # HTTP backend.
    "base_url": "http://127.0.0.1:8000",
    "api_key_env": "OPENAI_API_KEY",
    "max_concurrency": 16,
    "timeout_s": 600.0,
    "max_retries": 4,
    "backoff_s": 1.0,
    # Embedding requests carry this many texts each; the server truncates inputs to this many
    # tokens when set (otherwise an over-long text fails and is counted).
    "embed_batch_size": 64,
    "truncate_prompt_tokens": None,
}

def _sampling(temperature: float, top_p: float, top_k: int, max_tokens: int) -> dict[str, Any]:
    """A stage's sampling block. ``regex``/``choice``/``json`` ask for constrained decoding
    (vLLM structured outputs), e.g. ``choice: ["Yes", "No"]`` for the domain filter.
    ``chat_template_kwargs`` go to the chat template of this stage's requests, over the model's
    own: thinking is off unless a stage asks for it (``{"enable_thinking": true}``; the authors
    annotate without it). Templates without that switch ignore it."""
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k,
            "max_tokens": max_tokens, "regex": None, "choice": None, "json": None,
            "chat_template_kwargs": {"enable_thinking": False}}


DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    # Items per shard: a crash loses at most one shard's work; every shard is one engine batch.
    "shard_size": 256,
    # Keep every model's engine alive across stages (fewer start-ups); False frees one engine
    # before the next starts, the safe choice on one accelerator.
    "keep_engines": False,
    "data": {
        # Domain corpus (JSONL with "id" or "_id", "text", optional "title").
        "corpus": None,
        "include_title": True,
        # Files of benchmark gold ids (one per line) or BRIGHT example files (.jsonl[.gz]) whose
        # gold_ids / gold_ids_long are read; none of these documents may become a source.
        "exclude_ids": [],
        # Texts (JSONL with "text"/"gold_answer", or BRIGHT example files) that may not be sources.
        "exclude_texts": [],
    },
    "models": {
        "writer": {},
        "judge": {},
        "embedder": {"runner": "pooling"},
    },
    "filter": {
        "enabled": False,
        "model": "judge",
        "sampling": _sampling(0.0, 1.0, -1, 512),
        "max_attempts": 2,
    },
    "sources": {"min_chars": 200, "max_chars": 5000, "sample_size": 10000},
    "queries": {
        "model": "writer",
        "sampling": _sampling(1.0, 0.6, -1, 2048),
        "max_attempts": 3,
        "min_chars": 10,
        "length_weights": {
            "fewer than 100 words": 1,
            "100 to 200 words": 2,
            "200 to 300 words": 3,
            "300 to 400 words": 3,
            "400 to 500 words": 2,
            "at least 500 words": 1,
        },
        "education_weights": {"high school": 1, "college": 2, "PhD": 2},
    },
    "mining": {
        "model": "embedder",
        "top_k": 100,
        # The teacher also keeps its ranks top_k+1 .. pool_k (unjudged, in "pool") for the
        # NV-Retriever negatives; None: no pool. A CPU run judges a short list (top_k of a few),
        # so its negatives come from this deeper ranking, guarded by the positive-aware filter.
        "pool_k": None,
        # Candidates scoring below this are not retrieved (then the list is padded at random).
        "min_score": None,
        "pad_random": True,
        # The corpus is embedded (and cached for resumption) in chunks of this many texts.
        "corpus_chunk_size": 50000,
    },
    "annotation": {
        "model": "judge",
        "sampling": _sampling(0.7, 0.95, 40, 2048),
        "max_attempts": 2,
        # The judge sees at most this many characters of each candidate (cut at a word boundary,
        # marked with "..."); None: the whole document. Prompt reading dominates a CPU engine.
        "max_document_chars": None,
    },
    # require_judged_negative: drop a query whose judged candidates hold no negative (the
    # method's rule, the judged negatives being the training negatives). With NV-Retriever
    # negatives replacing them, false keeps such queries (they still need a positive).
    "split": {"pos_min_score": 3, "neg_min_score": 1, "neg_max_score": 2,
              "require_judged_negative": True},
    "reasoning": {
        "model": "judge",
        "sampling": _sampling(0.7, 0.95, 40, 2048),
        "max_attempts": 2,
        # "reasoning": q' is the reasoning text; "query_plus_reasoning": query, blank line, text.
        "mode": "reasoning",
        # Input records: "split" (annotated negatives) or "nv_negatives" (NV-Retriever negatives).
        "input": "split",
    },
    "nv_negatives": {
        # "perc_pos": keep n if s(q,n) < perc * s(q,p); "margin_pos": if s(q,n) < s(q,p) - margin.
        "method": "perc_pos",
        "perc": 0.95,
        "margin": 0.05,
        "filter_top": 10,
        "num_negatives": 4,
    },
}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


# Keys whose value is free-form data: replaced whole by the user's value, never key-checked.
FREE_FORM_KEYS = frozenset(
    {"extra_engine_args", "chat_template_kwargs", "length_weights", "education_weights"}
)


def _merge(base: dict[str, Any], update: Mapping[str, Any], path: str) -> None:
    for key, value in update.items():
        where = f"{path}.{key}" if path else key
        if key not in base:
            raise ConfigError(f"unknown config key '{where}'")
        if key in FREE_FORM_KEYS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{where}' must be an object")
            base[key] = copy.deepcopy(dict(value))
        elif isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{where}' must be an object")
            _merge(base[key], value, where)
        else:
            base[key] = copy.deepcopy(value)


def _model_entry(entry: Any, name: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"models.{name} must be an object")
    full = copy.deepcopy(MODEL_DEFAULTS)
    _merge(full, entry, f"models.{name}")
    return full


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value); the value is JSON if it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override '{text}' has an empty key")
    return keys, value


def apply_override(config: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    """Sets one nested key. Only existing keys may be set, except a new model under ``models``
    and entries inside free-form objects (``chat_template_kwargs`` etc.)."""
    node: Any = config
    for i, key in enumerate(keys[:-1]):
        if keys[0] == "models" and i == 1 and key not in node:
            node[key] = copy.deepcopy(MODEL_DEFAULTS)
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"unknown config key '{'.'.join(keys[: i + 1])}'")
        node = node[key]
    if not isinstance(node, dict):
        raise ConfigError(f"config key '{'.'.join(keys[:-1])}' is not an object")
    free = len(keys) >= 2 and keys[-2] in FREE_FORM_KEYS
    if keys[-1] not in node and not free:
        raise ConfigError(f"unknown config key '{'.'.join(keys)}'")
    node[keys[-1]] = value


def load_config(path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults, then the JSON file at ``path`` (if any), then ``key.path=value`` overrides."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    user: Mapping[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            try:
                user = json.load(f)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(user, Mapping):
            raise ConfigError(f"{path}: the top level must be a JSON object")
    models = dict(config.pop("models"))
    user_models = user.get("models", {})
    if not isinstance(user_models, Mapping):
        raise ConfigError("models must be an object")
    config["models"] = {}
    _merge(config, {k: v for k, v in user.items() if k != "models"}, "")
    for name in {**models, **user_models}:
        config["models"][name] = _model_entry({**models.get(name, {}),
                                               **user_models.get(name, {})}, name)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(config, keys, value)
    validate_config(config)
    return config


def validate_config(config: Mapping[str, Any]) -> None:
    """Checks the values that would otherwise fail late, deep inside a stage."""
    if not isinstance(config["shard_size"], int) or config["shard_size"] < 1:
        raise ConfigError("shard_size must be an integer >= 1")
    for stage in ("filter", "queries", "mining", "annotation", "reasoning"):
        name = config[stage]["model"]
        if name not in config["models"]:
            raise ConfigError(
                f"{stage}.model names '{name}', not one of {sorted(config['models'])}")
    for name, entry in config["models"].items():
        if entry["backend"] not in ("vllm", "openai"):
            raise ConfigError(f"models.{name}.backend must be 'vllm' or 'openai'")
        if entry["runner"] not in ("generate", "pooling"):
            raise ConfigError(f"models.{name}.runner must be 'generate' or 'pooling'")
    src = config["sources"]
    if not 0 <= src["min_chars"] <= src["max_chars"]:
        raise ConfigError("sources: need 0 <= min_chars <= max_chars")
    for key in ("length_weights", "education_weights"):
        weights = config["queries"][key]
        if not weights or any((not isinstance(w, int | float)) or w < 0 for w in weights.values()) \
                or sum(weights.values()) <= 0:
            raise ConfigError(f"queries.{key} must map labels to non-negative weights, sum > 0")
    if config["reasoning"]["mode"] not in ("reasoning", "query_plus_reasoning"):
        raise ConfigError("reasoning.mode must be 'reasoning' or 'query_plus_reasoning'")
    if config["reasoning"]["input"] not in ("split", "nv_negatives"):
        raise ConfigError("reasoning.input must be 'split' or 'nv_negatives'")
    if config["nv_negatives"]["method"] not in NV_METHODS:
        raise ConfigError("nv_negatives.method must be 'perc_pos' or 'margin_pos'")
    split = config["split"]
    if not split["neg_min_score"] <= split["neg_max_score"] < split["pos_min_score"]:
        raise ConfigError("split: need neg_min_score <= neg_max_score < pos_min_score")
    if not isinstance(split["require_judged_negative"], bool):
        raise ConfigError("split.require_judged_negative must be true or false")
    if not split["require_judged_negative"] and config["reasoning"]["input"] != "nv_negatives":
        raise ConfigError("split.require_judged_negative=false keeps records without judged "
                          "negatives: it needs reasoning.input=nv_negatives to supply them")
    top_k, pool_k = config["mining"]["top_k"], config["mining"]["pool_k"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"mining.top_k must be an integer >= 1, got {top_k!r}")
    if pool_k is not None and (isinstance(pool_k, bool) or not isinstance(pool_k, int)
                               or pool_k < top_k):
        raise ConfigError(f"mining.pool_k must be null or an integer >= mining.top_k "
                          f"({top_k}), got {pool_k!r}")
    cut = config["annotation"].get("max_document_chars")
    if cut is not None and (isinstance(cut, bool) or not isinstance(cut, int) or cut < 1):
        raise ConfigError(f"annotation.max_document_chars must be a positive integer or null, "
                          f"got {cut!r}")
    for stage in ("filter", "queries", "annotation", "reasoning"):
        if int(config[stage]["max_attempts"]) < 1:
            raise ConfigError(f"{stage}.max_attempts must be >= 1")
