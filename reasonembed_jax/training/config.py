"""The training configuration: one ``ml_collections.ConfigDict`` with small, typed groups.

Config files in ``configs/`` call ``base_config()`` and change what their recipe needs; the
variants after ``path:`` go through ``parse_variants`` (an unknown one is an error); the command
line overrides any field (``--config.optim.learning_rate=3e-5``); an unknown key is an error
naming it (the dict is locked).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import types
from collections.abc import Iterable
from typing import Any

import ml_collections
from ml_collections import config_dict

from reasonembed_jax.data.pipeline import default_data_config
from reasonembed_jax.lora import PROJECTIONS
from reasonembed_jax.model.sharding import RULE_SETS, check_rules


def load_module(path: str | os.PathLike) -> types.ModuleType:
    """The Python file at ``path`` run as a fresh module (not added to ``sys.modules``). Config
    files are loaded this way, and load ``configs/common.py`` this way too, by its path next to
    their own ``__file__``: the configs folder is not a package and need not be on ``sys.path``."""
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(
        f"config_{os.path.splitext(os.path.basename(path))[0]}", path)
    if spec is None:
        raise FileNotFoundError(f"not a Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file given as ``path[:arg]`` (the ``--config`` syntax)."""
    path, _, arg = os.fspath(spec).partition(":")
    return load_module(path).get_config(arg or None)


def parse_variants(arg: str | None, allowed: Iterable[str]) -> frozenset[str]:
    """The variants in a config file's ``arg`` (``path:lora,gradcache``: comma-separated names).
    A name not in ``allowed`` is a ``ValueError`` naming it and the allowed ones."""
    allowed = tuple(allowed)
    variants = frozenset(v.strip() for v in (arg or "").split(",")) - {""}
    unknown = sorted(variants - set(allowed))
    if unknown:
        raise ValueError(f"unknown config variant(s) {', '.join(map(repr, unknown))}; this config "
                         f"takes {', '.join(allowed) if allowed else 'no variants'}")
    return variants


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, at its default (the ReasonEmbed recipe where it has one)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.init = "hf"  # "hf": weights from hf_dir; "scratch": random init from hf_dir's config
    c.model.hf_dir = ""  # local HF folder (config.json [+ safetensors] [+ tokenizer])
    # Shrink the architecture for scratch runs (demo/tests): layers, hidden, heads, kv_heads,
    # head_dim, intermediate. Empty: the config as is.
    c.model.shrink = ml_collections.ConfigDict()
    c.model.param_dtype = "float32"  # master weights
    c.model.frozen_dtype = "bfloat16"  # the base weights under LoRA (never updated)
    c.model.dtype = "bfloat16"  # compute
    # "auto": the family's own (causal for decoders, bidirectional for BERT); or either name.
    c.model.attention = "auto"
    # How attention runs: "auto" (cuDNN's fused kernel on GPU in bf16/fp16, else "matmul"),
    # "matmul" (our batched matmuls), "xla" or "cudnn" (jax.nn.dot_product_attention's).
    c.model.attention_impl = "auto"
    c.model.scan_layers = True
    c.model.remat_policy = "full"  # none | full | dots | save_projections
    c.model.pooling = "last_token"
    # Train with the HF config's dropout rates (BERT family: hidden and attention dropout, as
    # model.train() in PyTorch). Decoders have no dropout.
    c.model.dropout = False

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.lora.dropout = 0.1
    c.lora.targets = PROJECTIONS
    c.lora.init_a = "kaiming_uniform"  # PEFT's default; "normal": N(0, 1/fan_in) (lora.LORA_A_INITS)

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "ri_infonce"  # infonce | ri_infonce | qwen3_masked
    c.loss.temperature = 0.02
    c.loss.kappa = 5.0
    c.loss.ri_warmup_steps = 100
    c.loss.qwen3_margin = 0.1
    c.loss.mask_duplicate_positives = True  # in-batch copies of a positive are not negatives
    # Encode reasoning queries with dropout on (training mode, no gradient), as the authors do.
    c.loss.reasoning_dropout = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.1
    # "warmup_decay": linear warm-up then optim.decay; "deepspeed": DeepSpeed's WarmupDecayLR as
    # the HF Trainer fills it (warm-up optim.warmup_type, then linear decay to 0; see
    # step.deepspeed_warmup_decay_schedule).
    c.optim.schedule = "warmup_decay"
    c.optim.warmup_type = "log"  # deepspeed schedule only: log (DeepSpeed's default) | linear
    c.optim.decay = "linear"  # linear | cosine | constant
    c.optim.end_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    # Clip (and Adam eps) as a PyTorch DDP run over this many ranks that back-propagates a gathered
    # loss through each rank's own embeddings only: its optimizer sees 1/W of our global-mean
    # gradient, so clip_norm acts at W * clip_norm here (step.make_optimizer). 1: plain clipping.
    c.optim.reference_world_size = 1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical-axis rules (model.sharding.RULE_SETS): "default" replicates parameters over the
    # data axis; "fsdp" shards them (and their optimizer state) over every data-parallel device.
    c.mesh.rules = "default"
    # ((logical name, mesh axis | (mesh axes) | None), ...) replacing entries of that set.
    c.mesh.rule_overrides = ()

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.num_steps = config_dict.placeholder(int)  # None: one pass as the data config says
    c.train.grad_cache = False
    c.train.grad_cache_chunk = 8  # rows per device per GradCache chunk
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.max_consecutive_nan = 5
    c.train.peak_tflops_per_device = config_dict.placeholder(float)  # for MFU; None: by device
    c.train.export_at_end = True
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps; 0: never during training
    c.eval.data = ""  # e.g. "beir:../shared/data/beir_scifact"
    c.eval.split = ""  # "": BEIR test qrels / BRIGHT examples
    c.eval.top_k = 100
    c.eval.max_length = 512
    c.eval.batch_size = 32

    c.export = ml_collections.ConfigDict()
    c.export.query_instruction = ""  # default query prompt written for sentence-transformers
    c.export.max_length = 512
    c.export.dtype = "bfloat16"

    c.data = default_data_config()
    return c


# ---------------------------------------------------------------------------------------------
# Validation (when the config is resolved, before anything is built)
# ---------------------------------------------------------------------------------------------

_INT, _REAL = "an integer", "a number"
# key -> (kind, low, high, low_inclusive, may_be_none). A value must be finite and in range;
# None is "unset" only where the field is a placeholder, and 0 never means unset.
_RANGES: dict[str, tuple[str, float, float, bool, bool]] = {
    "lora.rank": (_INT, 1, math.inf, True, False),
    "lora.alpha": (_REAL, 0, math.inf, False, False),
    "lora.dropout": (_REAL, 0, 1, True, False),
    "loss.temperature": (_REAL, 0, math.inf, False, False),
    "loss.kappa": (_REAL, 0, math.inf, False, False),
    "loss.ri_warmup_steps": (_INT, 0, math.inf, True, False),
    "loss.qwen3_margin": (_REAL, -2, 2, True, False),
    "optim.learning_rate": (_REAL, 0, math.inf, False, False),
    "optim.weight_decay": (_REAL, 0, math.inf, True, False),
    "optim.warmup_ratio": (_REAL, 0, 1, True, False),
    "optim.end_ratio": (_REAL, 0, 1, True, False),
    "optim.b1": (_REAL, 0, 1, True, False),
    "optim.b2": (_REAL, 0, 1, True, False),
    "optim.eps": (_REAL, 0, math.inf, True, False),
    "optim.clip_norm": (_REAL, 0, math.inf, False, True),
    "optim.reference_world_size": (_INT, 1, math.inf, True, False),
    "train.num_steps": (_INT, 1, math.inf, True, True),
    "train.grad_cache_chunk": (_INT, 1, math.inf, True, False),
    "train.log_every": (_INT, 1, math.inf, True, False),
    "train.checkpoint_every": (_INT, 1, math.inf, True, False),
    "train.keep_checkpoints": (_INT, 1, math.inf, True, False),
    "train.max_consecutive_nan": (_INT, 1, math.inf, True, False),
    "train.peak_tflops_per_device": (_REAL, 0, math.inf, False, True),
    "eval.every": (_INT, 0, math.inf, True, False),  # 0: never (documented), not "unset"
    "eval.top_k": (_INT, 1, math.inf, True, False),
    "eval.max_length": (_INT, 1, math.inf, True, False),
    "eval.batch_size": (_INT, 1, math.inf, True, False),
    "export.max_length": (_INT, 1, math.inf, True, False),
    "data.group_size": (_INT, 1, math.inf, True, False),
    "data.batch_size": (_INT, 1, math.inf, True, False),
    "data.num_devices": (_INT, 1, math.inf, True, True),
    "data.num_epochs": (_REAL, 0, math.inf, False, False),
    "data.max_steps": (_INT, 1, math.inf, True, True),
    "data.query_max_length": (_INT, 1, math.inf, True, False),
    "data.passage_max_length": (_INT, 1, math.inf, True, False),
    "data.reasoning_max_length": (_INT, 1, math.inf, True, False),
    "data.max_text_chars": (_INT, 1, math.inf, True, False),
    "data.max_reported_errors": (_INT, 0, math.inf, True, False),
    "data.worker_count": (_INT, 0, math.inf, True, False),
    "data.worker_buffer_size": (_INT, 1, math.inf, True, False),
    "data.read_threads": (_INT, 1, math.inf, True, False),
}
# Fields whose upper end is open: b1 and b2 must stay below 1, dropout below 1.
_OPEN_ABOVE = {"lora.dropout", "optim.b1", "optim.b2"}


def check_number(key: str, value: Any, kind: str, low: float, high: float = math.inf, *,
                 low_inclusive: bool = True, high_inclusive: bool = True,
                 may_be_none: bool = False) -> None:
    """Raises ``ValueError`` naming ``key`` unless ``value`` is a finite number of ``kind`` in
    range (``None`` allowed only with ``may_be_none``)."""
    if value is None:
        if may_be_none:
            return
        raise ValueError(f"{key} must be set (got None)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} must be {kind}, got {value!r}")
    if kind == _INT and float(value) != int(value):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{key} must be finite, got {value!r}")
    too_low = value < low if low_inclusive else value <= low
    too_high = value > high if high_inclusive else value >= high
    if too_low or too_high:
        lo = f"{'>=' if low_inclusive else '>'} {low:g}"
        hi = "" if high == math.inf else f" and {'<=' if high_inclusive else '<'} {high:g}"
        unset = " (None means unset; 0 is not)" if may_be_none and value == 0 else ""
        raise ValueError(f"{key} must be {lo}{hi}, got {value!r}{unset}")


def axis_rules(config: ml_collections.ConfigDict) -> tuple:
    """The logical-axis rules of ``config.mesh``: the named set with ``rule_overrides`` applied
    (an override of a name the set lacks adds it). Raises ``ValueError`` on an unknown set or a
    malformed rule."""
    name = config.mesh.get("rules", "default")
    if name not in RULE_SETS:
        raise ValueError(f"mesh.rules must be one of {sorted(RULE_SETS)}, got {name!r}")
    overrides = dict(check_rules(config.mesh.get("rule_overrides", ()) or ()))
    rules = [(k, overrides.pop(k, v)) for k, v in RULE_SETS[name]]
    return check_rules(rules + list(overrides.items()))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every numeric setting the trainer reads; raises ``ValueError`` naming the first
    bad key (``optim.learning_rate must be > 0, got nan``). Keys a config lacks are skipped."""
    for key, (kind, low, high, low_inc, none_ok) in _RANGES.items():
        group, _, name = key.partition(".")
        if group not in config or name not in config[group]:
            continue
        if key == "lora.rank" and not config.lora.get("enabled", True):
            continue
        check_number(key, config[group][name], kind, low, high, low_inclusive=low_inc,
                     high_inclusive=key not in _OPEN_ABOVE, may_be_none=none_ok)
    for axis in ("data", "fsdp", "tensor"):  # -1: the devices left over (one axis at most)
        if "mesh" in config and axis in config.mesh and config.mesh[axis] != -1:
            check_number(f"mesh.{axis}", config.mesh[axis], _INT, 1)
    if "mesh" in config and "rules" in config.mesh:
        axis_rules(config)
    if "data" in config:
        for length in config.data.get("buckets", ()) or ():
            check_number("data.buckets[]", length, _INT, 1)
        for domain, override in dict(config.data.get("domains") or {}).items():
            for field in ("group_size", "batch_size"):
                if field in override:
                    check_number(f"data.domains.{domain}.{field}", override[field], _INT, 1)
