"""LoRA's low-rank product has its own backward (``lora._low_rank_up``, written so XLA:CPU does not
fuse the gradient's producer into a transposed copy): its gradients must equal plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np

from reasonembed_jax.lora import EQUATIONS, LoraConfig, _low_rank_up, lora_project


def test_low_rank_up_gradients_equal_autodiff_of_the_plain_product():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    low = jax.random.normal(k1, (24, 8))
    b = jax.random.normal(k2, (8, 40))
    w = jax.random.normal(k3, (24, 40))

    def loss(fn, low, b):
        return jnp.sum(jnp.sin(fn(low, b)) * w)

    ours = jax.grad(lambda lo, bb: loss(_low_rank_up, lo, bb), argnums=(0, 1))(low, b)
    plain = jax.grad(lambda lo, bb: loss(jnp.matmul, lo, bb), argnums=(0, 1))(low, b)
    for a, r in zip(ours, plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_lora_projection_gradients_equal_the_einsum_formula():
    """Every projection's equation (attention heads and MLP): output and the gradients of A, B
    and the input against ``W x + s (x A) B`` written with plain einsums."""
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    project = lora_project(lora, train=False)
    shapes = {"bth,hnd->btnd": ((2, 5, 6), (6, 3, 4)), "btnd,ndh->bth": ((2, 5, 3, 4), (3, 4, 6)),
              "bth,hm->btm": ((2, 5, 6), (6, 7)), "btm,mh->bth": ((2, 5, 7), (7, 6))}
    for name, equation in EQUATIONS.items():
        x_shape, w_shape = shapes[equation]
        xs, kernel = equation.split("->")[0].split(",")
        contracted = "".join(c for c in kernel if c in xs)
        produced = "".join(c for c in kernel if c not in xs)
        n_in = len(contracted)
        keys = jax.random.split(jax.random.key(len(name)), 4)
        x = jax.random.normal(keys[0], x_shape)
        p = {name: jax.random.normal(keys[1], w_shape),
             f"{name}.lora_a": jax.random.normal(keys[2], w_shape[:n_in] + (4,)),
             f"{name}.lora_b": jax.random.normal(keys[3], (4,) + w_shape[n_in:])}

        def reference(x, a, b, equation=equation, contracted=contracted, produced=produced,
                      xs=xs, name=name, p=p):
            batch = "".join(c for c in xs if c not in contracted)
            out = equation.split("->")[1]
            low = jnp.einsum(f"{xs},{contracted}r->{batch}r", x, a)
            return (jnp.einsum(equation, x, p[name])
                    + lora.scale * jnp.einsum(f"{batch}r,r{produced}->{out}", low, b))

        def ours(x, a, b, name=name, equation=equation, p=p):
            return project(name, x, {**p, f"{name}.lora_a": a, f"{name}.lora_b": b}, equation)

        args = (x, p[f"{name}.lora_a"], p[f"{name}.lora_b"])
        np.testing.assert_allclose(np.asarray(ours(*args)), np.asarray(reference(*args)),
                                   rtol=1e-5, atol=1e-5)
        g_ours = jax.grad(lambda *a: jnp.sum(jnp.tanh(ours(*a))), argnums=(0, 1, 2))(*args)
        g_ref = jax.grad(lambda *a: jnp.sum(jnp.tanh(reference(*a))), argnums=(0, 1, 2))(*args)
        for a, r in zip(g_ours, g_ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)
