"""Losses against independent numpy implementations of method.md's formulas (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from reasonembed_jax import losses
from reasonembed_jax.model import make_mesh

TAU = 0.02


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_per_query(q, p, g, tau=TAU):
    s = _unit(q) @ _unit(p).T / tau
    out = []
    for i in range(len(q)):
        row = s[i]
        m = row.max()
        out.append(m + np.log(np.exp(row - m).sum()) - row[i * g])
    return np.array(out)


def np_qwen3(q, p, g, tau=TAU, margin=0.1):
    qn, pn = _unit(q), _unit(p)
    out = []
    for i in range(len(q)):
        pos = i * g
        s_pos = qn[i] @ pn[pos]
        terms = [s_pos]
        for j in range(len(p)):
            if j != pos and qn[i] @ pn[j] <= s_pos + margin:
                terms.append(qn[i] @ pn[j])
        for j in range(len(q)):
            if j != i and qn[i] @ qn[j] <= s_pos + margin:
                terms.append(qn[i] @ qn[j])
        for j in range(len(p)):
            if j != pos and pn[pos] @ pn[j] <= s_pos + margin:
                terms.append(pn[pos] @ pn[j])
        t = np.array(terms) / tau
        out.append(np.log(np.exp(t - t.max()).sum()) + t.max() - s_pos / tau)
    return np.array(out)


def _data(b, g, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, d))
    p = rng.normal(size=(b * g, d))
    p[::g] += 0.15 * q  # positives weakly related, so losses span a useful range
    rq = q + rng.normal(scale=1.0, size=q.shape)
    return q, p, rq


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("b,g", [(6, 1), (4, 3), (5, 8)])
def test_infonce_matches_numpy(b, g):
    q, p, _ = _data(b, g)
    loss, aux = losses.infonce_loss(jnp.asarray(q), jnp.asarray(p), group_size=g)
    ref = np_per_query(q, p, g)
    np.testing.assert_allclose(aux["per_query_loss"], ref, rtol=1e-6)
    np.testing.assert_allclose(loss, ref.mean(), rtol=1e-6)


@pytest.mark.parametrize("b,g", [(6, 1), (4, 3)])
@pytest.mark.parametrize("kappa", [5.0, 1.2])
def test_ri_infonce_matches_numpy(b, g, kappa):
    q, p, rq = _data(b, g, seed=3)
    loss, aux = losses.ri_infonce_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(rq),
                                       group_size=g, kappa=kappa)
    lq, lr = np_per_query(q, p, g), np_per_query(rq, p, g)
    w = np.clip(lq / (lr + 1e-6), 0, kappa)
    w /= w.sum()
    np.testing.assert_allclose(aux["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(loss, (w * lq).sum(), rtol=1e-6)
    if kappa == 1.2:
        assert (lq / (lr + 1e-6) > kappa).any(), "the case must exercise the clip"
    plain, _ = losses.ri_infonce_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(rq),
                                      group_size=g, use_weights=False)
    np.testing.assert_allclose(plain, lq.mean(), rtol=1e-6)


def test_ri_weights_carry_no_gradient():
    """d/dq of sum_i w_i L_i equals sum_i w_i dL_i/dq with w held constant; rq gets none."""
    q, p, rq = (jnp.asarray(a) for a in _data(4, 2, seed=5))
    _, aux = losses.ri_infonce_loss(q, p, rq, group_size=2)
    w = aux["weights"]
    g_ri = jax.grad(lambda q, rq: losses.ri_infonce_loss(q, p, rq, group_size=2)[0],
                    argnums=(0, 1))(q, rq)
    g_fixed = jax.grad(lambda q: jnp.sum(w * losses.per_query_infonce(q, p, group_size=2)))(q)
    np.testing.assert_allclose(g_ri[0], g_fixed, rtol=1e-9)
    assert float(jnp.abs(g_ri[1]).max()) == 0.0


@pytest.mark.parametrize("b,g", [(5, 1), (4, 4)])
def test_qwen3_masked_matches_numpy(b, g):
    q, p, _ = _data(b, g, seed=7)
    p[1] = _unit(q)[0] * 3  # a passage far closer than query 0's positive: must be masked
    loss, aux = losses.qwen3_masked_infonce_loss(jnp.asarray(q), jnp.asarray(p), group_size=g)
    ref = np_qwen3(q, p, g)
    np.testing.assert_allclose(aux["per_query_loss"], ref, rtol=1e-6)
    np.testing.assert_allclose(loss, ref.mean(), rtol=1e-6)


def test_weighted_infonce_matches_numpy():
    q, p, _ = _data(6, 2, seed=9)
    w = np.array([1.0, 0.0, 2.0, 0.5, 3.0, 1.0])
    loss, _ = losses.weighted_infonce_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(w),
                                           group_size=2)
    np.testing.assert_allclose(loss, (w * np_per_query(q, p, 2)).sum() / w.sum(), rtol=1e-6)


def test_labels_point_at_positives_not_gathered_negatives():
    """Each query's positive is an exact copy of it and its negatives are copies of *other*
    queries: a label pointing anywhere but column i*G would give a loss far from the numpy one."""
    rng = np.random.default_rng(1)
    b, g = 8, 4
    q = rng.normal(size=(b, 8))
    p = np.concatenate([np.stack([q[i]] + [q[(i + k) % b] for k in range(1, g)])
                        for i in range(b)])
    loss, _ = losses.infonce_loss(jnp.asarray(q), jnp.asarray(p), group_size=g)
    np.testing.assert_allclose(loss, np_per_query(q, p, g).mean(), rtol=1e-6)


def test_sharded_gradients_match_unsharded_and_analytic():
    """On 8 devices with the batch sharded, the loss and its gradient with respect to the scores
    equal the single-device values and the analytic ``(softmax - onehot) / B``: the negatives are
    global and the gradient scale is the global mean."""
    b, g = 16, 2
    q, p, _ = _data(b, g, seed=11)
    mesh = make_mesh(data=4, fsdp=2)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    qs, ps = jax.device_put(jnp.asarray(q), rows), jax.device_put(jnp.asarray(p), rows)
    assert len(qs.sharding.device_set) == 8

    def f(q, p):
        return losses.infonce_loss(q, p, group_size=g)[0]

    loss_s, (gq_s, gp_s) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(qs, ps)
    loss_1, (gq_1, gp_1) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(p))
    np.testing.assert_allclose(loss_s, loss_1, rtol=1e-9)
    np.testing.assert_allclose(gq_s, gq_1, rtol=1e-8)
    np.testing.assert_allclose(gp_s, gp_1, rtol=1e-8)
    # Analytic gradient with respect to the score matrix (cosines / tau).
    qn, pn = _unit(q), _unit(p)
    s = qn @ pn.T / TAU
    soft = np.exp(s - s.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    onehot = np.zeros_like(soft)
    onehot[np.arange(b), np.arange(b) * g] = 1
    d_scores = (soft - onehot) / b
    # Chain rule through s = qn pn^T / tau for pre-normalised inputs.
    gq_analytic = d_scores @ pn / TAU
    gq_norm = jax.grad(f)(jax.device_put(jnp.asarray(qn), rows), jax.device_put(jnp.asarray(pn), rows))
    proj = gq_analytic - (gq_analytic * qn).sum(1, keepdims=True) * qn  # normalisation Jacobian
    np.testing.assert_allclose(gq_norm, proj, rtol=1e-7, atol=1e-10)


def test_copies_of_the_positive_leave_the_softmax():
    """A passage text that is query i's positive and also sits in another group (as that
    record's negative) is not a negative for query i: numpy reference drops those columns."""
    b, g = 4, 3
    q, p, rq = _data(b, g, seed=13)
    p[4] = p[0]  # query 0's positive is query 1's first negative
    p[9] = p[6]  # query 2's positive is query 3's second negative
    keys = np.arange(b * g)
    keys[4], keys[9] = keys[0], keys[6]
    s = _unit(q) @ _unit(p).T / TAU
    ref = []
    for i in range(b):
        cols = [j for j in range(b * g) if j == i * g or keys[j] != keys[i * g]]
        row = s[i, cols]
        ref.append(np.log(np.exp(row - row.max()).sum()) + row.max() - s[i, i * g])
    ref = np.array(ref)
    loss, aux = losses.infonce_loss(jnp.asarray(q), jnp.asarray(p), group_size=g,
                                    passage_keys=jnp.asarray(keys))
    np.testing.assert_allclose(aux["per_query_loss"], ref, rtol=1e-6)
    unmasked, _ = losses.infonce_loss(jnp.asarray(q), jnp.asarray(p), group_size=g)
    assert float(unmasked) > float(loss)
    # Query 1's own negative (column 4) is still a negative for query 1.
    ri, ri_aux = losses.ri_infonce_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(rq),
                                        group_size=g, passage_keys=jnp.asarray(keys))
    np.testing.assert_allclose(ri_aux["per_query_loss"], ref, rtol=1e-6)
