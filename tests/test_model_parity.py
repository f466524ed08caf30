"""Numerical parity of our decoder with HF transformers (PyTorch) on tiny random models."""

import dataclasses

import numpy as np
import pytest
import torch

import hf_models
from reasonembed_jax import hf_io
from reasonembed_jax.model import make_mesh
from reasonembed_jax.model.pooling import pool
from reasonembed_jax.text import load_tokenizer, tokenize_texts

TEXTS = [
    "Why are insects attracted to LED lights if they give off almost no heat?",
    "short",
    "Given an integer array nums, return the length of the longest strictly increasing "
    "subsequence. Explain the O(n log n) patience-sorting idea and why it is correct.",
    "Wie funktioniert Photosynthese? 光合作用是如何工作的？",
]


@pytest.fixture(scope="module", params=sorted(hf_models.FAMILIES))
def family_model(request, hf_configs_dir, tmp_path_factory):
    family = request.param
    cfg = hf_models.tiny_hf_config(hf_configs_dir, family)
    torch_model = hf_models.build_hf_model(cfg)
    path = hf_models.save_hf_model(torch_model, tmp_path_factory.mktemp(family))
    return family, torch_model, path


def _inputs(family, qwen3_tokenizer_dir):
    if family == "llama":  # the Qwen tokenizer's ids exceed the tiny Llama vocab: random ids
        rng = np.random.default_rng(0)
        lengths = [11, 3, 17, 7]
        width = 20
        ids = np.zeros((4, width), np.int32)
        mask = np.zeros((4, width), np.int32)
        for i, n in enumerate(lengths):
            ids[i, width - n:] = rng.integers(0, 512, n)
            mask[i, width - n:] = 1
        return ids, mask
    tokenizer = load_tokenizer(qwen3_tokenizer_dir)
    return tokenize_texts(tokenizer, TEXTS, max_length=64, buckets=None)


def _hf_hidden(torch_model, ids, mask):
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.last_hidden_state.float().numpy()


def test_hidden_states_match_hf_on_left_padded_batch(family_model, qwen3_tokenizer_dir):
    family, torch_model, path = family_model
    ids, mask = _inputs(family, qwen3_tokenizer_dir)
    assert (mask[:, 0] == 0).any(), "the batch must contain left padding"
    ref = _hf_hidden(torch_model, ids, mask)
    model = hf_io.load_encoder(path)
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    # Pooled embeddings: our pooling of our states equals a plain numpy pooling of HF's states.
    last = np.array([ref[i, np.nonzero(mask[i])[0][-1]] for i in range(len(ids))])
    last /= np.linalg.norm(last, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(pool(ours, mask, "last_token")), last, atol=1e-5)
    mean = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(pool(ours, mask, "mean")), mean, atol=1e-5)


def test_padding_does_not_change_embeddings(family_model, qwen3_tokenizer_dir):
    """Each row run alone through HF (no padding at all) equals its row of our padded batch."""
    family, torch_model, path = family_model
    ids, mask = _inputs(family, qwen3_tokenizer_dir)
    model = hf_io.load_encoder(path)
    ours = np.asarray(pool(model(ids, mask), mask, "last_token"))
    for i in range(len(ids)):
        real = ids[i][mask[i].astype(bool)][None]
        alone = _hf_hidden(torch_model, real, np.ones_like(real))[0, -1]
        np.testing.assert_allclose(ours[i], alone / np.linalg.norm(alone), atol=1e-5)


def test_llama3_rope_scaling_is_applied(hf_configs_dir, tmp_path):
    """Dropping the llama3 rope scaling changes the HF output, and we still match HF with it."""
    cfg = hf_models.tiny_hf_config(hf_configs_dir, "llama")
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    torch_model = hf_models.build_hf_model(cfg)
    path = hf_models.save_hf_model(torch_model, tmp_path / "scaled")
    ids = np.arange(1, 41, dtype=np.int32)[None] % 512
    mask = np.ones_like(ids)
    ref = _hf_hidden(torch_model, ids, mask)
    unscaled = hf_models.build_hf_model(dict(cfg, rope_scaling=None))
    assert np.abs(_hf_hidden(unscaled, ids, mask) - ref).max() > 1e-3
    np.testing.assert_allclose(np.asarray(hf_io.load_encoder(path)(ids, mask)), ref, atol=1e-4)


def test_scan_unrolled_and_remat_agree(family_model, qwen3_tokenizer_dir):
    family, _, path = family_model
    ids, mask = _inputs(family, qwen3_tokenizer_dir)
    scanned = np.asarray(hf_io.load_encoder(path)(ids, mask))
    unrolled = np.asarray(hf_io.load_encoder(path, scan_layers=False)(ids, mask))
    remat = hf_io.load_encoder(path, remat_policy="full")
    import jax

    def loss(params, model):
        return (dataclasses.replace(model, params=params)(ids, mask) ** 2).mean()

    plain = hf_io.load_encoder(path)
    grads_remat = jax.grad(loss)(remat.params, remat)
    grads_plain = jax.grad(loss)(plain.params, plain)
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_sharded_load_matches_single_device(family_model, qwen3_tokenizer_dir):
    """Weights streamed straight into a (data 2, fsdp 2, tensor 2) layout give the same states."""
    family, _, path = family_model
    ids, mask = _inputs(family, qwen3_tokenizer_dir)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = hf_io.load_encoder(path, mesh=mesh)
    q = sharded.params["layers.q_proj"]
    assert q.sharding.spec[1] == "fsdp" and q.sharding.spec[2] == "tensor"
    assert q.addressable_shards[0].data.shape[1] == q.shape[1] // 2
    single = np.asarray(hf_io.load_encoder(path)(ids, mask))
    np.testing.assert_allclose(np.asarray(sharded(ids, mask)), single, atol=1e-5)


def test_bidirectional_attention_sees_future_tokens(family_model, qwen3_tokenizer_dir):
    family, _, path = family_model
    ids, mask = _inputs(family, qwen3_tokenizer_dir)
    causal = np.asarray(hf_io.load_encoder(path)(ids, mask))
    bidir_model = hf_io.load_encoder(path, attention="bidirectional")
    bidir = np.asarray(bidir_model(ids, mask))
    real = mask.astype(bool)
    # The last token sees everything in both modes only through different routes; the first
    # real token differs because it now attends to the rest of its sequence.
    first = [np.nonzero(m)[0][0] for m in mask]
    multi = [i for i in range(len(ids)) if mask[i].sum() > 1]
    assert all(np.abs(causal[i, first[i]] - bidir[i, first[i]]).max() > 1e-4 for i in multi)
    # Changing a later token changes an earlier state only in bidirectional mode.
    ids2 = ids.copy()
    ids2[:, -1] = (ids2[:, -1] + 1) % 500
    assert np.abs(np.asarray(bidir_model(ids2, mask))[:, -2] - bidir[:, -2])[real[:, -2]].max() > 0
    causal2 = np.asarray(hf_io.load_encoder(path)(ids2, mask))
    np.testing.assert_allclose(causal2[:, :-1][real[:, :-1]], causal[:, :-1][real[:, :-1]],
                               atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(family_model, qwen3_tokenizer_dir):
    family, torch_model, path = family_model
    ids, mask = _inputs(family, qwen3_tokenizer_dir)
    ref = np.asarray(pool(hf_io.load_encoder(path)(ids, mask), mask))
    bf16 = hf_io.load_encoder(path, dtype="bfloat16")
    low = np.asarray(pool(bf16(ids, mask), mask))
    assert bf16.params["layers.q_proj"].dtype == np.float32  # fp32 master weights
    assert (low * ref).sum(-1).min() > 0.99


@pytest.mark.parametrize("scan,attention,remat", [(True, "causal", "none"),
                                                  (False, "causal", "full"),
                                                  (True, "bidirectional", "none")])
def test_last_token_only_forward_equals_full_forward(family_model, qwen3_tokenizer_dir, scan,
                                                     attention, remat):
    """The shortcut (last layer computed only at the pooled position) equals HF's full hidden
    state at the last real token, in value and in gradient."""
    import jax
    import jax.numpy as jnp

    from reasonembed_jax.model.encoder import forward

    family, torch_model, path = family_model
    ids, mask = _inputs(family, qwen3_tokenizer_dir)
    model = hf_io.load_encoder(path, scan_layers=scan, attention=attention, remat_policy=remat)
    params = model.params
    short = forward(model.config, params, ids, mask, last_token_only=True)
    full = forward(model.config, params, ids, mask)
    last = np.array([np.nonzero(m)[0][-1] for m in mask])
    np.testing.assert_allclose(np.asarray(short), np.asarray(full)[np.arange(len(ids)), last],
                               atol=2e-5)
    if attention == "causal":
        ref = _hf_hidden(torch_model, ids, mask)
        np.testing.assert_allclose(np.asarray(short), ref[np.arange(len(ids)), last], atol=1e-4)

    def loss(p, shortcut):
        if shortcut:
            return jnp.sum(forward(model.config, p, ids, mask, last_token_only=True) ** 2)
        return jnp.sum(pool(forward(model.config, p, ids, mask), mask, normalize=False) ** 2)

    g_short = jax.grad(loss)(params, True)
    g_full = jax.grad(loss)(params, False)
    for name in g_full:
        a, b = np.asarray(g_short[name]), np.asarray(g_full[name])
        assert np.linalg.norm(a - b) <= 1e-4 * max(np.linalg.norm(b), 1e-6), name
