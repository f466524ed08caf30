"""LoRA adapters on the projections of either family (decoder or BERT):
``W x + (alpha / r) * B A dropout(x)``.

Adapters are extra stacked parameters next to the base ones, ``layers.<proj>.lora_a
[L, *in, r]`` and ``layers.<proj>.lora_b [L, r, *out]``, so they scan with their layer and shard by
logical axes like every other parameter. ``A`` starts random (PEFT's default by default) and ``B`` at
zero, so training starts from the base model exactly. ``merge_lora`` folds them into the base
weights for export.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from reasonembed_jax.model.decoder import ProjectFn, split_equation
from reasonembed_jax.model.dropout import dropout
from reasonembed_jax.model.encoder import ModelConfig
from reasonembed_jax.model.params import LAYER_PREFIX, param_specs

Array = jax.Array
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The contraction each projection performs in ``decoder_layer`` (activation, kernel -> output).
EQUATIONS = {
    "q_proj": "bth,hnd->btnd", "k_proj": "bth,hnd->btnd", "v_proj": "bth,hnd->btnd",
    "o_proj": "btnd,ndh->bth", "gate_proj": "bth,hm->btm", "up_proj": "bth,hm->btm",
    "down_proj": "btm,mh->bth",
}
DROPOUT_KEYS = "lora_dropout_keys"
# How A is drawn (fan_in: the input width of the adapted projection):
#   kaiming_uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in): PEFT's default
#       (torch's kaiming_uniform_ with a = sqrt(5) on the [r, fan_in] lora_A weight);
#   normal: N(0, 1/fan_in), this project's earlier default.
LORA_A_INITS = ("kaiming_uniform", "normal")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.1
    targets: tuple[str, ...] = PROJECTIONS
    init_a: str = "kaiming_uniform"

    def __post_init__(self) -> None:
        if self.init_a not in LORA_A_INITS:
            raise ValueError(f"LoRA init_a must be one of {LORA_A_INITS}, got '{self.init_a}'")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"unknown LoRA target modules {unknown}; choose from {PROJECTIONS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_param_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[tuple, tuple]]:
    """``{path: (shape, logical_axes)}`` of the adapter parameters."""
    specs = param_specs(config)
    out = {}
    for name in lora.targets:
        if LAYER_PREFIX + name not in specs:
            have = [n for n in PROJECTIONS if LAYER_PREFIX + n in specs]
            raise ValueError(f"LoRA target '{name}' does not exist in a {config.model_type} model; "
                             f"its projections are {have}")
        spec = specs[LAYER_PREFIX + name]
        _, _, _, contracted, _ = split_equation(EQUATIONS[name])
        n_in = len(contracted)
        layers, in_shape, out_shape = spec.shape[0], spec.shape[1:1 + n_in], spec.shape[1 + n_in:]
        in_axes, out_axes = spec.logical_axes[1:1 + n_in], spec.logical_axes[1 + n_in:]
        out[f"{LAYER_PREFIX}{name}.lora_a"] = ((layers, *in_shape, lora.rank),
                                               ("layers", *in_axes, "lora_rank"))
        out[f"{LAYER_PREFIX}{name}.lora_b"] = ((layers, lora.rank, *out_shape),
                                               ("layers", "lora_rank", *out_axes))
    return out


def init_lora(config: ModelConfig, lora: LoraConfig, key: Array) -> dict[str, Array]:
    """``A`` drawn as ``lora.init_a`` says (``LORA_A_INITS``), ``B = 0`` (the adapted model starts
    equal to the base)."""
    params = {}
    shapes = lora_param_shapes(config, lora)
    keys = jax.random.split(key, len(shapes))
    for k, (path, (shape, _)) in zip(keys, sorted(shapes.items()), strict=True):
        if path.endswith(".lora_a"):
            fan_in = 1
            for d in shape[1:-1]:
                fan_in *= d
            scale = 1.0 / jnp.sqrt(fan_in)
            if lora.init_a == "normal":
                params[path] = jax.random.normal(k, shape, jnp.float32) * scale
            else:
                params[path] = jax.random.uniform(k, shape, jnp.float32, -scale, scale)
        else:
            params[path] = jnp.zeros(shape, jnp.float32)
    return params


def _name_salt(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def lora_project(lora: LoraConfig, *, train: bool) -> ProjectFn:
    """A ``project`` hook for ``forward`` that adds the adapters (with dropout when ``train``).

    Dropout keys travel as the per-layer entry ``DROPOUT_KEYS`` so every layer and projection
    draws its own mask, reproducibly from the step's key.
    """
    targets = frozenset(lora.targets)

    def project(name: str, x: Array, p: Mapping[str, Array], equation: str) -> Array:
        # The frozen product stays an einsum: as decoder.project_matmul's 2-D matmul the LoRA
        # step measured 7-9% slower on XLA:CPU (README, "Speed against PyTorch").
        y = jnp.einsum(equation, x, p[name])
        if name not in targets:
            return y
        xs, _, out, contracted, produced = split_equation(equation)
        batch = "".join(c for c in xs if c not in contracted)
        inp = x
        if train and lora.dropout > 0.0:
            key = jax.random.fold_in(jax.random.wrap_key_data(p[DROPOUT_KEYS]), _name_salt(name))
            inp = dropout(x, lora.dropout, key)
        a = p[f"{name}.lora_a"].astype(x.dtype)
        b = p[f"{name}.lora_b"].astype(x.dtype)
        low = jnp.einsum(f"{xs},{contracted}r->{batch}r", inp, a)
        up = _low_rank_up(low.reshape(-1, low.shape[-1]), b.reshape(b.shape[0], -1))
        return y + lora.scale * up.reshape(low.shape[:-1] + b.shape[1:])

    return project


@jax.custom_vjp
def _low_rank_up(low: Array, b: Array) -> Array:
    """``low [N, r] @ b [r, P]``; its backward materialises the incoming ``[N, P]`` gradient
    once before the two products, so XLA:CPU does not fuse the producer of that gradient into
    a transposed copy for ``low^T @ g`` (measured: a 1 s/step fusion on SmolLM2)."""
    return low @ b


def _low_rank_up_fwd(low: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    return low @ b, (low, b)


def _low_rank_up_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    low, b = res
    g = jax.lax.optimization_barrier(g)
    return g @ b.T, low.T @ g


_low_rank_up.defvjp(_low_rank_up_fwd, _low_rank_up_bwd)


def with_dropout_keys(params: Mapping[str, Array], key: Array, num_layers: int) -> dict[str, Array]:
    """Adds one dropout key per layer (as raw key data, so it scans like a parameter)."""
    out = dict(params)
    out[LAYER_PREFIX + DROPOUT_KEYS] = jax.random.key_data(
        jax.random.split(jax.random.wrap_key_data(key) if key.dtype == jnp.uint32 else key,
                         num_layers))
    return out


def merge_lora(
    base: Mapping[str, Array], adapters: Mapping[str, Array], lora: LoraConfig
) -> dict[str, Array]:
    """Base parameters with ``(alpha/r) * A B`` added to every adapted kernel. Adapted kernels
    come back in float32 (at least): rounding the sum to a bf16 base would drop much of the
    small update."""
    merged = dict(base)
    for name in lora.targets:
        path = LAYER_PREFIX + name
        _, kernel, _, contracted, produced = split_equation(EQUATIONS[name])
        a, b = adapters[f"{path}.lora_a"], adapters[f"{path}.lora_b"]
        delta = jnp.einsum(f"l{contracted}r,lr{produced}->l{kernel}", a.astype(jnp.float32),
                           b.astype(jnp.float32))
        dtype = jnp.promote_types(base[path].dtype, jnp.float32)
        merged[path] = (base[path].astype(jnp.float32) + lora.scale * delta).astype(dtype)
    return merged

