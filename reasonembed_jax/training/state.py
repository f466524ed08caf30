"""What a run trains, built from the config: model and LoRA settings, the optimizer, and the train
state, first as shapes with shardings, then as values.

    setup = build_setup(config)                       # mesh, rules, model, LoRA, step settings
    schedule, optimizer = make_optimizer_from_config(config, num_steps)
    abstract = abstract_state(setup, optimizer)       # (state, frozen) ShapeDtypeStructs + shardings
    state, frozen = init_state(setup, optimizer)      # the same tree, with values, in those shardings

The shardings come from the parameter table (``model.params.param_specs``, plus LoRA's
``lora_param_shapes``) through the config's axis rules; an array leaf of the parameters or the
optimizer state that matches no table row is an error, never a silent replication.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reasonembed_jax import hf_io
from reasonembed_jax.cli import UserError
from reasonembed_jax.lora import PROJECTIONS, LoraConfig, init_lora, lora_param_shapes, merge_lora
from reasonembed_jax.model.encoder import ModelConfig, config_from_hf, config_from_hf_dir
from reasonembed_jax.model.params import LAYER_PREFIX, init_param_value, param_specs
from reasonembed_jax.model.sharding import Rules, make_mesh, named_sharding
from reasonembed_jax.tiny_model import shrink_hf_config
from reasonembed_jax.training.config import axis_rules, validate_config
from reasonembed_jax.training.step import (
    SCHEDULES,
    StepConfig,
    deepspeed_warmup_decay_schedule,
    make_optimizer,
    make_schedule,
)

BATCH_FIELDS = ("query", "passage", "reasoning")


class TrainingError(UserError, RuntimeError):
    """A setting, input or run condition the user must change (one line on the CLI)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run derives from its config before it touches weights or data."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: Rules
    model_cfg: ModelConfig
    # The model config the base weights are kept in: under LoRA they are constants, stored in
    # the (smaller) ``model.frozen_dtype``.
    base_cfg: ModelConfig
    lora: LoraConfig | None
    step_cfg: StepConfig
    fields: tuple[str, ...]  # the batch roles the step reads


def build_setup(config: ml_collections.ConfigDict) -> Setup:
    """Validates ``config`` and builds the mesh, model, LoRA and step settings from it."""
    try:
        validate_config(config)
        rules = axis_rules(config)
    except ValueError as e:
        raise TrainingError(f"config.{e}") from None
    mesh = make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)
    model_cfg = model_config(config)
    lora = lora_config(config, model_cfg)
    base_cfg = (model_cfg.replace(param_dtype=config.model.frozen_dtype) if lora is not None
                else model_cfg)
    step_cfg = StepConfig(
        model=model_cfg, loss=config.loss.kind, temperature=config.loss.temperature,
        kappa=config.loss.kappa, ri_warmup_steps=config.loss.ri_warmup_steps,
        qwen3_margin=config.loss.qwen3_margin,
        mask_duplicate_positives=config.loss.mask_duplicate_positives,
        reasoning_dropout=bool(config.loss.reasoning_dropout),
        pooling=config.model.pooling, lora=lora, dropout=bool(config.model.dropout),
        grad_cache=config.train.grad_cache,
        chunk_rows_per_device=config.train.grad_cache_chunk, mesh=mesh, rules=rules,
    )
    if step_cfg.uses_reasoning and not config.data.use_reasoning_query:
        raise TrainingError("loss.kind='ri_infonce' needs data.use_reasoning_query=True")
    fields = BATCH_FIELDS if step_cfg.uses_reasoning else BATCH_FIELDS[:2]
    return Setup(config, mesh, rules, model_cfg, base_cfg, lora, step_cfg, fields)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    m = config.model
    if not m.hf_dir:
        raise TrainingError("config.model.hf_dir is empty: name a local HF folder")
    path = os.path.join(m.hf_dir, "config.json")
    if not os.path.isfile(path):
        raise TrainingError(f"no config.json in config.model.hf_dir={m.hf_dir}")
    with open(path) as f:
        hf = json.load(f)
    if m.shrink:
        s = dict(m.shrink)
        hf = shrink_hf_config(hf, layers=s["layers"], hidden=s["hidden"], heads=s["heads"],
                              kv_heads=s["kv_heads"], head_dim=s.get("head_dim"),
                              intermediate=s.get("intermediate"))
        if m.init == "hf":
            raise TrainingError("config.model.shrink only makes sense with model.init='scratch'")
    runtime = dict(param_dtype=m.param_dtype, dtype=m.dtype, scan_layers=m.scan_layers,
                   remat_policy=m.remat_policy, attention_impl=m.get("attention_impl", "auto"))
    if m.attention != "auto":
        runtime["attention"] = m.attention
    try:
        # From the folder when its weights are loaded: the family may read them (BERT's pooler).
        return config_from_hf_dir(m.hf_dir, **runtime) if m.init == "hf" else config_from_hf(
            hf, **runtime)
    except ValueError as e:
        raise TrainingError(f"config.model: {e}") from e


def lora_config(config: ml_collections.ConfigDict, model: ModelConfig) -> LoraConfig | None:
    """The LoRA settings; the default target list (every projection name) means every projection
    ``model`` has (BERT has no gate_proj). An explicit list must name existing projections."""
    if not config.lora.enabled:
        return None
    targets = tuple(config.lora.targets)
    if targets == PROJECTIONS:
        specs = param_specs(model)
        targets = tuple(t for t in targets if LAYER_PREFIX + t in specs)
    try:
        lora = LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                          dropout=config.lora.dropout, targets=targets, init_a=config.lora.init_a)
    except ValueError as e:
        raise TrainingError(f"config.lora: {e}") from e
    try:
        lora_param_shapes(model, lora)
    except ValueError as e:
        raise TrainingError(f"config.lora.targets: {e}") from e
    return lora


def make_optimizer_from_config(config: ml_collections.ConfigDict, num_steps: int
                               ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule and optimizer of ``config.optim`` for a run of ``num_steps``."""
    o = config.optim
    if o.schedule == "deepspeed":
        if o.decay != "linear" or o.end_ratio:
            raise TrainingError("optim.schedule='deepspeed' decays linearly to 0: leave "
                                "optim.decay='linear' and optim.end_ratio=0")
        schedule = deepspeed_warmup_decay_schedule(o.learning_rate, num_steps,
                                                   warmup_ratio=o.warmup_ratio,
                                                   warmup_type=o.warmup_type)
    elif o.schedule == "warmup_decay":
        schedule = make_schedule(o.learning_rate, num_steps, warmup_ratio=o.warmup_ratio,
                                 decay=o.decay, end_ratio=o.end_ratio)
    else:
        raise TrainingError(f"optim.schedule must be one of {SCHEDULES}, got '{o.schedule}'")
    optimizer = make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                               eps=o.eps, clip_norm=o.clip_norm,
                               reference_world_size=int(o.reference_world_size))
    return schedule, optimizer


# ---------------------------------------------------------------------------------------------
# Shapes with shardings
# ---------------------------------------------------------------------------------------------


def param_axes(setup: Setup) -> dict[str, tuple[str | None, ...]]:
    """``{table path: logical axes}`` of every parameter the run holds (base and adapters)."""
    axes = {p: s.logical_axes for p, s in param_specs(setup.model_cfg).items()}
    if setup.lora is not None:
        axes.update({p: a for p, (_, a) in lora_param_shapes(setup.model_cfg, setup.lora).items()})
    return axes


def split_trainable(cfg: ModelConfig, params: dict[str, Any]) -> tuple[dict, dict]:
    """(trained, frozen) parts of full fine-tuning: table rows marked ``trainable=False`` (BERT's
    unused pooler) stay constant and are exported as loaded."""
    specs = param_specs(cfg)
    trained = {p: v for p, v in params.items() if specs[p].trainable}
    return trained, {p: v for p, v in params.items() if not specs[p].trainable}


def _fresh_state(trainable: dict, optimizer: optax.GradientTransformation, seed: int) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": trainable,
            "opt_state": optimizer.init(trainable),
            "rng": jax.random.key_data(jax.random.key(seed + 2))}


def with_shardings(setup: Setup, tree: Any) -> Any:
    """``tree``'s leaves as ShapeDtypeStructs with their shardings: a leaf under a parameter path
    (a parameter, or an optimizer moment keyed by it) by that row's logical axes; the step, the
    RNG key and rank-0 optimizer counters replicated. Any other leaf raises ``TrainingError``."""
    axes = param_axes(setup)
    replicated = NamedSharding(setup.mesh, PartitionSpec())

    def attach(path: Any, leaf: Any) -> jax.ShapeDtypeStruct:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        name = next((n for n in reversed(names) if isinstance(n, str) and n in axes), None)
        if name is not None:
            if len(axes[name]) != len(leaf.shape):
                raise TrainingError(f"state leaf {jax.tree_util.keystr(path)} has shape "
                                    f"{leaf.shape} but its parameter '{name}' has logical axes "
                                    f"{axes[name]}")
            sharding = named_sharding(setup.mesh, axes[name], leaf.shape, setup.rules)
        elif names[:1] in (["step"], ["rng"]) or not leaf.shape:
            sharding = replicated
        else:
            raise TrainingError(f"state leaf {jax.tree_util.keystr(path)} {leaf.shape} matches "
                                "no parameter row: no sharding rule for it")
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(attach, tree)


def abstract_state(setup: Setup, optimizer: optax.GradientTransformation) -> tuple[dict, dict]:
    """``(state, frozen)`` as ShapeDtypeStructs with shardings: what ``init_state`` makes, from
    the parameter table alone (no weights read, nothing allocated)."""
    specs = param_specs(setup.base_cfg)
    base = {p: jax.ShapeDtypeStruct(s.shape, setup.base_cfg.jnp_param_dtype)
            for p, s in specs.items()}
    if setup.lora is not None:
        trainable = {p: jax.ShapeDtypeStruct(shape, jnp.float32)
                     for p, (shape, _) in lora_param_shapes(setup.model_cfg, setup.lora).items()}
        frozen = base
    else:
        trainable, frozen = split_trainable(setup.model_cfg, base)
    state = jax.eval_shape(lambda t: _fresh_state(t, optimizer, 0), trainable)
    return with_shardings(setup, state), with_shardings(setup, frozen)


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.sharding, tree)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def init_state(setup: Setup, optimizer: optax.GradientTransformation) -> tuple[dict, dict]:
    """``(state, frozen)``: base weights read from the HF folder (``model.init='hf'``) or drawn
    at random, adapters drawn, optimizer state initialised, each directly in the sharding
    ``abstract_state`` gives it (never materialised whole on one device)."""
    config = setup.config
    seed = config.train.seed
    state_shapes, frozen_shapes = abstract_state(setup, optimizer)
    if setup.lora is None:  # the base weights are the trained ones, plus any frozen rows
        base_shardings = {**_shardings(state_shapes["params"]), **_shardings(frozen_shapes)}
    else:
        base_shardings = _shardings(frozen_shapes)
    if config.model.init == "hf":
        base = hf_io.load_hf_params(config.model.hf_dir, setup.base_cfg, mesh=setup.mesh,
                                    rules=setup.rules)
    elif config.model.init == "scratch":
        specs = param_specs(setup.base_cfg)

        def init_base() -> dict[str, jax.Array]:
            keys = jax.random.split(jax.random.key(seed), len(specs))
            return {path: init_param_value(spec, k, setup.base_cfg)
                    for k, (path, spec) in zip(keys, specs.items(), strict=True)}

        base = jax.jit(init_base, out_shardings=base_shardings)()
    else:
        raise TrainingError(f"config.model.init must be 'hf' or 'scratch', got "
                            f"'{config.model.init}'")
    if setup.lora is not None:
        lora = setup.lora
        trainable = jax.jit(lambda: init_lora(setup.model_cfg, lora, jax.random.key(seed + 1)),
                            out_shardings=_shardings(state_shapes["params"]))()
        frozen = base
    else:
        trainable, frozen = split_trainable(setup.model_cfg, base)
    # The same function abstract_state traced, now run into its shardings; the parameters are
    # donated, so they are aliased, not copied.
    state = jax.jit(lambda t: _fresh_state(t, optimizer, seed),
                    out_shardings=_shardings(state_shapes), donate_argnums=(0,))(trainable)
    return state, frozen


def merged_params(setup: Setup, state: dict, frozen: dict) -> dict[str, jax.Array]:
    """The full parameter table of a train state (LoRA folded into the base weights)."""
    if setup.lora is None:
        return {**frozen, **state["params"]}
    return _merge_lora(frozen, state["params"], setup.lora)


# One compiled merge per (shapes, LoRA settings): evaluation calls it every ``eval.every`` steps.
_merge_lora = jax.jit(merge_lora, static_argnums=(2,))
