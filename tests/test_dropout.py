"""The hash-based dropout masks (``model/dropout.py``) against the statistics of independent
Bernoulli draws: the keep rate, pairwise independence along every axis and across keys, uniform
bits, and the same mask sharded over 8 devices as on one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from reasonembed_jax.model.dropout import dropout, keep_mask, random_bits
from reasonembed_jax.model.sharding import make_mesh

SHAPE = (4, 6, 256, 256)  # [batch, heads, query, key]: 1.57M draws


def within(observed: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - p) <= sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_pairwise_independence(rate):
    keep = np.asarray(keep_mask(jax.random.key(0), rate, SHAPE))
    q = 1.0 - rate
    assert within(keep.mean(), q, keep.size)
    for axis in range(keep.ndim):  # neighbours along each axis: both kept with probability q^2
        a = np.take(keep, range(keep.shape[axis] - 1), axis=axis)
        b = np.take(keep, range(1, keep.shape[axis]), axis=axis)
        assert within((a & b).mean(), q * q, a.size), axis
    other = np.asarray(keep_mask(jax.random.key(1), rate, SHAPE))
    assert within((keep & other).mean(), q * q, keep.size)  # another key: independent
    assert np.array_equal(keep, np.asarray(keep_mask(jax.random.key(0), rate, SHAPE)))
    folded = np.asarray(keep_mask(jax.random.fold_in(jax.random.key(0), 1), rate, SHAPE))
    assert within((keep & folded).mean(), q * q, keep.size)


def test_bits_are_uniform():
    bits = np.asarray(random_bits(jax.random.key(3), SHAPE))
    n = bits.size
    for shift in (0, 8, 16, 24):  # every byte: chi-square over 256 bins (255 degrees of freedom)
        counts = np.bincount(((bits >> shift) & 0xFF).ravel(), minlength=256)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert chi2 < 255 + 6 * np.sqrt(2 * 255), (shift, chi2)
    for bit in range(32):  # every bit position: ones with probability 1/2
        assert within(((bits >> bit) & 1).mean(), 0.5, n), bit


def test_dropout_scales_kept_values_and_handles_any_rank():
    x = jnp.ones((64, 300), jnp.float32)
    y = np.asarray(dropout(x, 0.25, jax.random.key(0)))
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / 0.75)}
    assert within((y > 0).mean(), 0.75, y.size)
    assert dropout(x, 0.0, jax.random.key(0)) is x and dropout(x, 0.3, None) is x
    for shape in [(1000,), (7, 9, 11, 13, 3)]:
        assert within(float(keep_mask(jax.random.key(2), 0.5, shape).mean()), 0.5,
                      int(np.prod(shape)))
    with pytest.raises(ValueError, match="rate"):
        keep_mask(jax.random.key(0), 1.0, (4, 4))


def test_sharded_mask_equals_unsharded():
    mesh = make_mesh(data=4, fsdp=2)
    x = jnp.arange(np.prod((8, 4, 64, 64)), dtype=jnp.float32).reshape(8, 4, 64, 64)
    key = jax.random.key(7)
    one = np.asarray(jax.jit(lambda v: dropout(v, 0.1, key))(x))
    for spec in (PartitionSpec(("data", "fsdp")), PartitionSpec(None, "fsdp", "data")):
        sharded = jax.device_put(x, NamedSharding(mesh, spec))
        fn = jax.jit(lambda v: dropout(v, 0.1, key), out_shardings=sharded.sharding)
        many = fn(sharded)
        assert len(many.sharding.device_set) == 8
        np.testing.assert_array_equal(one, np.asarray(many))


def test_lora_input_dropout_follows_the_formula():
    """LoRA's adapter input dropout: ``x W + s ((keep * x / (1 - p)) A) B`` in float64 numpy, with
    the mask the adapter's key draws (its per-projection salt)."""
    from reasonembed_jax.lora import DROPOUT_KEYS, LoraConfig, _name_salt, lora_project

    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.3, targets=("up_proj",))
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 16, 32)), rng.standard_normal((32, 48))
    a, b = rng.standard_normal((32, 4)), rng.standard_normal((4, 48))
    key_data = jax.random.key_data(jax.random.key(5))
    params = {"up_proj": w, "up_proj.lora_a": a, "up_proj.lora_b": b, DROPOUT_KEYS: key_data}
    params = {k: jnp.asarray(v, jnp.float32) if k != DROPOUT_KEYS else v for k, v in params.items()}
    y = np.asarray(lora_project(lora, train=True)("up_proj", jnp.asarray(x, jnp.float32), params,
                                                  "btd,dh->bth"))
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), _name_salt("up_proj"))
    keep = np.asarray(keep_mask(key, 0.3, x.shape))
    assert within(keep.mean(), 0.7, keep.size)
    expected = x @ w + lora.scale * (((keep * x / 0.7) @ a) @ b)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-3)
    y_eval = np.asarray(lora_project(lora, train=False)("up_proj", jnp.asarray(x, jnp.float32),
                                                        params, "btd,dh->bth"))
    np.testing.assert_allclose(y_eval, x @ w + lora.scale * (x @ a @ b), rtol=1e-4, atol=1e-3)
