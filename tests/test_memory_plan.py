"""Memory of the compiled LoRA + GradCache step (XLA's memory analysis on one CPU device).

1. No parameter-sized temporaries: temp memory grows with the batch and the adapters, not with
   the frozen base (two tiny models that differ only in their MLP width).
2. XLA:CPU's float32 copies of bf16 weights (a CPU artifact, see README, memory plans) are found
   in the compiled HLO and reported apart: checked against the parameter shapes and against a
   second compile with loop-invariant code motion off, which does not make them."""

import jax
import jax.numpy as jnp
import numpy as np

from reasonembed_jax.lora import LoraConfig, lora_param_shapes
from reasonembed_jax.model.encoder import config_from_hf
from reasonembed_jax.model.params import param_specs
from reasonembed_jax.training.memory_plan import memory_report
from reasonembed_jax.training.step import StepConfig, make_optimizer, make_train_step

NO_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _plans(intermediate: int, dtype: str = "float32", layers: int = 8, rows: int = 2, t: int = 16,
           options: tuple[dict | None, ...] = (None,)) -> tuple[dict, list[dict]]:
    """(frozen parameter shapes, memory report per compiler-options entry) of the step on one
    device, with the frozen base and the compute in ``dtype``."""
    hf = dict(model_type="qwen3", vocab_size=64, hidden_size=128, intermediate_size=intermediate,
              num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    cfg = config_from_hf(hf, dtype=dtype, remat_policy="full")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    step_cfg = StepConfig(model=cfg, loss="ri_infonce", lora=lora, grad_cache=True,
                          chunk_rows_per_device=rows)
    opt = make_optimizer(1e-4)
    frozen = {p: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype))
              for p, s in param_specs(cfg).items()}
    trainable = {p: jax.ShapeDtypeStruct(s, jnp.float32)
                 for p, (s, _) in lora_param_shapes(cfg, lora).items()}
    state = jax.eval_shape(lambda tr: {"step": jnp.zeros((), jnp.int32), "params": tr,
                                       "opt_state": opt.init(tr),
                                       "rng": jax.random.key_data(jax.random.key(0))}, trainable)
    batch = {}
    for role, n in (("query", 2 * rows), ("passage", 4 * rows), ("reasoning", 2 * rows)):
        batch[f"{role}_input_ids"] = jax.ShapeDtypeStruct((n, t), jnp.int32)
        batch[f"{role}_attention_mask"] = jax.ShapeDtypeStruct((n, t), jnp.int32)
    fn = jax.jit(make_train_step(step_cfg, opt, lambda s: 0.0), donate_argnums=(0,))
    lowered = fn.lower(state, frozen, batch)
    gib = 2.0**30
    reports = [{k: v * gib for k, v in memory_report(lowered.compile(compiler_options=o)).items()}
               for o in options]
    return {p: s.shape for p, s in frozen.items()}, reports


def test_lora_step_temporaries_do_not_grow_with_the_frozen_base():
    shapes_small, (small,) = _plans(256)
    shapes_big, (big,) = _plans(4096)
    base_small = sum(4 * np.prod(s) for s in shapes_small.values())
    base_big = sum(4 * np.prod(s) for s in shapes_big.values())
    temp_small, temp_big = small["temp_gib"], big["temp_gib"]
    grown = (temp_big - temp_small) / (base_big - base_small)
    print(f"\nbase {base_small / 2**20:.1f} -> {base_big / 2**20:.1f} MiB, temp "
          f"{temp_small / 2**20:.2f} -> {temp_big / 2**20:.2f} MiB ({grown:.3f} per base byte)")
    # A few one-layer buffers (the scanned slice of each weight: 1/8 of the base here) and the
    # [rows, t, intermediate] activations may grow; a stacked copy of the base (what the sliced
    # scan and the lax.cond shortcut made) is 1.0 per base byte or more (2.2 before the fix).
    assert grown < 0.5
    # float32 compute: nothing to widen.
    assert small["cpu_widened_gib"] == big["cpu_widened_gib"] == 0


def test_cpu_float32_copies_of_bf16_weights_are_found_and_reported_apart():
    shapes, (hoisted, unhoisted) = _plans(512, "bfloat16", layers=4,
                                          options=(None, NO_HOISTING))
    projections = sum(2 * np.prod(s) for p, s in shapes.items() if p.endswith("_proj"))
    base = sum(2 * np.prod(s) for s in shapes.values())
    widened = hoisted["cpu_widened_gib"]
    saved = hoisted["temp_gib"] - unhoisted["temp_gib"]
    print(f"\nbf16 base {base / 2**20:.2f} MiB; temp {hoisted['temp_gib'] / 2**20:.2f} MiB, of "
          f"which float32 weight copies {widened / 2**20:.2f}; without hoisting temp "
          f"{unhoisted['temp_gib'] / 2**20:.2f} MiB")
    # Every projection stack has its float32 copy (2 bytes per bf16 byte), nothing beyond the base.
    assert 2 * projections <= widened <= 2 * base
    # The second compile path: without loop-invariant code motion the copies are not made, and
    # the temporaries shrink by at least what was reported as copies.
    assert unhoisted["cpu_widened_gib"] == 0
    assert saved >= 0.9 * widened
    assert hoisted["peak_less_widened_gib"] == hoisted["peak_gib"] - widened
