"""The compiled LoRA + GradCache step holds no parameter-sized temporaries: its temp memory
grows with the batch and the adapters, not with the frozen base (XLA's memory analysis of two
tiny models that differ only in their MLP width)."""

import jax
import jax.numpy as jnp

from reasonembed_jax.lora import LoraConfig, lora_param_shapes
from reasonembed_jax.model.encoder import config_from_hf
from reasonembed_jax.model.params import param_specs
from reasonembed_jax.training.step import StepConfig, make_optimizer, make_train_step


def _plan(intermediate: int, rows: int = 2, t: int = 16) -> tuple[float, float]:
    """(frozen base bytes, temp bytes) of the compiled step on one device (float32 compute:
    XLA:CPU widens bf16 matmuls to float32 and hoists the widened weights, which a GPU does
    not; see README, memory plans)."""
    hf = dict(model_type="qwen3", vocab_size=64, hidden_size=128, intermediate_size=intermediate,
              num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    cfg = config_from_hf(hf, dtype="float32", remat_policy="full")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    step_cfg = StepConfig(model=cfg, loss="ri_infonce", lora=lora, grad_cache=True,
                          chunk_rows_per_device=rows)
    opt = make_optimizer(1e-4)
    frozen = {p: jax.ShapeDtypeStruct(s.shape, jnp.float32) for p, s in param_specs(cfg).items()}
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
    mem = fn.lower(state, frozen, batch).compile().memory_analysis()
    base = sum(4 * s.size for s in frozen.values())
    return float(base), float(mem.temp_size_in_bytes)


def test_lora_step_temporaries_do_not_grow_with_the_frozen_base():
    base_small, temp_small = _plan(256)
    base_big, temp_big = _plan(4096)
    grown = (temp_big - temp_small) / (base_big - base_small)
    print(f"\nbase {base_small / 2**20:.1f} -> {base_big / 2**20:.1f} MiB, temp "
          f"{temp_small / 2**20:.2f} -> {temp_big / 2**20:.2f} MiB ({grown:.3f} per base byte)")
    # A few one-layer buffers (the scanned slice of each weight: 1/8 of the base here) and the
    # [rows, t, intermediate] activations may grow; a stacked copy of the base (what the sliced
    # scan and the lax.cond shortcut made) is 1.0 per base byte or more (2.2 before the fix).
    assert grown < 0.5
