"""Every attention implementation (model.attention_impl) against a numpy reference, against HF
transformers and against each other, on CPU.

``cudnn`` cannot run on CPU; its code path (reorder a left-padded batch to right padding, pass
sequence lengths, causal flag) is run here with ``jax.nn.dot_product_attention``'s XLA kernel in
place of cuDNN's, which takes the same arguments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from reasonembed_jax import hf_io
from reasonembed_jax.model import decoder
from reasonembed_jax.model.encoder import forward

IMPLS = ("matmul", "xla", "cudnn")


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """Routes ``implementation='cudnn'`` to the XLA kernel (same lengths/causal semantics)."""
    real = jax.nn.dot_product_attention

    def fake(*args, implementation=None, **kwargs):
        if implementation == "cudnn":
            assert kwargs.get("mask") is None, "the cudnn path must not rely on a boolean mask"
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)


def _left_padded(lengths, width, vocab=500, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(1, vocab, n)
        mask[i, width - n:] = 1
    return ids, mask


def _numpy_attention(q, k, v, mask, causal):
    """Plain float64 softmax attention per row and head over real keys (GQA by repetition)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, heads, d = q.shape
    group = heads // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    out = np.zeros_like(q)
    for i in range(b):
        for j in np.nonzero(mask[i])[0]:
            allowed = mask[i].astype(bool) & (np.arange(t) <= j if causal else True)
            for h in range(heads):
                s = k[i, allowed, h] @ q[i, j, h] / np.sqrt(d)
                w = np.exp(s - s.max())
                out[i, j, h] = (w / w.sum()) @ v[i, allowed, h]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_matches_numpy_on_real_tokens(impl, causal, cudnn_on_cpu):
    rng = np.random.default_rng(1)
    b, t, heads, kv_heads, d = 3, 7, 4, 2, 8
    q = rng.normal(size=(b, t, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
    _, mask = _left_padded([7, 4, 1], t)
    ref = _numpy_attention(q, k, v, mask, causal)
    ids = np.arange(b * t).reshape(b, t)
    restore = None
    if impl == "cudnn":  # what decoder_forward does before the layers
        _, mask_r, restore = decoder.to_right_padding(jnp.asarray(ids), jnp.asarray(mask))
        order = np.argsort(1 - mask, axis=1, kind="stable")
        q, k, v = (np.take_along_axis(a, order[:, :, None, None], axis=1) for a in (q, k, v))
        mask_in = mask_r
    else:
        mask_in = jnp.asarray(mask)
    am = decoder.AttentionMask(decoder.attention_mask_bias(mask_in, causal),
                               jnp.sum(mask_in, axis=1, dtype=jnp.int32))
    out = np.asarray(decoder.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), am,
                                       causal, impl))
    if restore is not None:
        out = np.take_along_axis(out, np.asarray(restore)[:, :, None, None], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_qwen3(hf_configs_dir, tmp_path_factory):
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "qwen3")
    torch_model = hf_models.build_hf_model(cfg)
    return torch_model, hf_models.save_hf_model(torch_model, tmp_path_factory.mktemp("qwen3"))


@pytest.mark.parametrize("impl", IMPLS)
def test_decoder_impls_match_hf_and_each_other(tiny_qwen3, impl, cudnn_on_cpu):
    """Left-padded GQA batch: hidden states of real tokens vs HF (eager attention) and vs the
    matmul path at 1e-5; the last-token shortcut and its gradient agree too."""
    torch_model, path = tiny_qwen3
    ids, mask = _left_padded([13, 5, 9, 1], 13)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long)
                          ).last_hidden_state.numpy()
    base = hf_io.load_encoder(path, attention_impl="matmul")
    model = hf_io.load_encoder(path, attention_impl=impl)
    params = model.params
    ours = np.asarray(forward(model.config, params, ids, mask))
    mine = np.asarray(forward(base.config, params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], mine[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    last = mask.shape[1] - 1  # left padding: the last real token is the last column
    short = forward(model.config, params, ids, mask, last_token_only=True)
    np.testing.assert_allclose(np.asarray(short), mine[:, last], atol=1e-5, rtol=1e-5)

    def loss(p, cfg):
        return jnp.sum(forward(cfg, p, ids, mask, last_token_only=True) ** 2)

    g, g_ref = jax.grad(loss)(params, model.config), jax.grad(loss)(params, base.config)
    for name in g_ref:
        a, b = np.asarray(g[name]), np.asarray(g_ref[name])
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-6), name


@pytest.mark.parametrize("impl", IMPLS)
def test_bert_impls_match_hf(tmp_path_factory, impl, cudnn_on_cpu):
    torch_model = hf_models.build_hf_bert(hf_models.tiny_bert_config())
    path = tmp_path_factory.mktemp("bert")
    torch_model.save_pretrained(path, safe_serialization=True)
    ids, mask = _left_padded([9, 4, 6], 9)
    model = hf_io.load_encoder(path, attention_impl=impl)
    base = hf_io.load_encoder(path, attention_impl="matmul")
    ours, mine = np.asarray(model(ids, mask)), np.asarray(base(ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], mine[real], atol=1e-5, rtol=1e-5)
    for i, n in enumerate(mask.sum(1)):  # HF on each row alone (no padding)
        with torch.no_grad():
            ref = torch_model(input_ids=torch.tensor(ids[i:i + 1, -n:], dtype=torch.long)
                              ).last_hidden_state[0].numpy()
        np.testing.assert_allclose(ours[i, -n:], ref, atol=1e-4, rtol=1e-4)


def test_auto_picks_matmul_on_cpu_and_bad_names_fail():
    assert decoder.resolve_attention_impl("auto", jnp.bfloat16) == "matmul"
    assert decoder.resolve_attention_impl("xla", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        decoder.resolve_attention_impl("flash", jnp.float32)
